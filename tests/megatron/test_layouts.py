"""Same weights and data give the same logits, loss, gradients and optimizer step in every
layout (fp32, 2 gloo ranks): TP2 with and without SP, PP2 through megatron-core's schedule,
and DP2 with megatron-core's DDP + optimizer vs DP1."""

import pytest

from megatron_ext.multirank import run_ranks

from .layouts import layouts_job


@pytest.fixture(scope="module")
def results():
    return run_ranks(layouts_job, 2, timeout=400)[0]


def _max_diff(a, b):
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("layout", ["tp2", "tp2sp"])
def test_tensor_parallel_matches_single(results, layout):
    assert float((results[f"{layout}_logits"] - results["ref_logits"]).abs().max()) < 1e-5
    assert abs(results[f"{layout}_loss"] - results["ref_loss"]) < 1e-5
    assert _max_diff(results[f"{layout}_grads"], results["ref_grads"]) < 1e-5


def test_pipeline_parallel_matches_single(results):
    assert abs(results["pp2_loss"] - results["ref_loss"]) < 1e-5
    grads = results["pp2_grads"]
    # PP2 with tied embeddings keeps the output weight on the last stage as its own copy.
    ref = {k: v for k, v in results["ref_grads"].items()}
    if "output_layer.weight" in grads and "output_layer.weight" not in ref:
        assert float((grads.pop("output_layer.weight") - ref["embedding.word_embeddings.weight"]).abs().max()) < 1e-5
    assert _max_diff(grads, ref) < 1e-5


def test_data_parallel_step_matches_single(results):
    assert abs(results["dp2_loss"] - results["dp1_loss"]) < 1e-5
    assert abs(results["dp2_loss"] - results["ref_loss"]) < 1e-5
    moved = _max_diff(results["dp2_params1"], results["ref_params0"])
    assert moved > 1e-4, "the optimizer step did not change the weights"
    assert _max_diff(results["dp2_params1"], results["dp1_params1"]) < 1e-5


def test_context_parallel_matches_single(results):
    assert float((results["cp2_logits"] - results["ref_logits"]).abs().max()) < 1e-5
    assert abs(results["cp2_loss"] - results["ref_loss"]) < 1e-5
    assert _max_diff(results["cp2_grads"], results["ref_grads"]) < 1e-5
