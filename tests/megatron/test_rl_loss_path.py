"""The RL loss path (packed micro-batches -> vocab-parallel log-probs -> algorithm loss) gives
the same loss and gradients in every layout: the normalisation contract of megatron_ext.train."""

import pytest

from megatron_ext.multirank import run_ranks

from .rl_layouts import MODES, rl_layouts_job, rl_tp_cp_job


@pytest.fixture(scope="module")
def results():
    return run_ranks(rl_layouts_job, 2, timeout=400)[0]


def _grad_diff(a, b):
    a, b = dict(a), dict(b)
    if "output_layer.weight" in a and "output_layer.weight" not in b:
        a.pop("output_layer.weight")  # PP's tied copy; its grad equals the embedding's
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["mb4", "tp1dp2", "tp2sp", "pp2", "pp2vpp2", "cp2"])
def test_loss_and_gradients_match_reference(results, layout, mode):
    ref_loss, ref_grads = results[f"ref_{mode}"]
    loss, grads = results[f"{layout}_{mode}"]
    assert abs(loss - ref_loss) < 1e-5
    assert _grad_diff(grads, ref_grads) < 1e-5
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-3  # not trivially zero


def test_interleaved_pipeline_pads_too_few_rows_with_an_empty_micro_batch(results):
    ref_loss, ref_grads = results["ref_one_row"]
    loss, grads = results["pp2vpp2_one_row"]
    assert abs(loss - ref_loss) < 1e-6
    assert _grad_diff(grads, ref_grads) < 1e-6
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-4
    assert results["pp2vpp2_one_row_old"] < 1e-5  # the no-grad pass skips the padding pack


def test_step0_old_equals_ref(results):
    assert results["old_equals_ref"]
    assert results["old_lengths"]


def test_packed_equals_each_sequence_alone(results):
    assert results["packed_vs_alone"] < 1e-5


@pytest.mark.parametrize("layout", ["cp2", "pp2vpp2"])
def test_no_grad_logprobs_are_whole_rows(results, layout):
    assert results[f"{layout}_old_lengths"]
    assert results[f"{layout}_old"] < 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["tp2spcp2", "pp2cp2", "dp2cp2", "pp2vpp2cp2"])
def test_cp_with_tp_pp_vpp_or_dp_on_four_ranks_matches_dp4(layout, mode, tp_cp_results):
    ref_loss, ref_grads = tp_cp_results[f"dp4_{mode}"]
    loss, grads = tp_cp_results[f"{layout}_{mode}"]
    assert abs(loss - ref_loss) < 1e-5
    assert _grad_diff(grads, ref_grads) < 1e-5


@pytest.fixture(scope="module")
def tp_cp_results():
    return run_ranks(rl_tp_cp_job, 4, timeout=400)[0]
