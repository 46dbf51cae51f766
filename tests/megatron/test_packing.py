"""Packing by token budget and the context-parallel split of a pack (single process)."""

import pytest
import torch

from megatron_ext.packing import (Row, cp_token_positions, pack, pack_all, pad_multiples,
                                  split_for_context_parallel)

ROWS = [Row(tokens=[5, 6, 7, 8, 9], loss_start=2), Row(tokens=[1, 2, 3], loss_start=1),
        Row(tokens=list(range(10, 21)), loss_start=4)]


def test_load_balanced_chunks_for_cp2():
    # One sequence of 8 tokens, 4 chunks of 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1, 2.
    assert cp_token_positions(torch.tensor([8]), 2, 0)[1].tolist() == [0, 1, 6, 7]
    assert cp_token_positions(torch.tensor([8]), 2, 1)[1].tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="sequence 0 has 6 tokens, not a multiple of 2 \\* CP = 8"):
        cp_token_positions(torch.tensor([6]), 4, 0)


def test_sequences_padded_to_multiple_keep_scored_tokens():
    mb = pack(ROWS, [0, 1, 2], seq_multiple=4, pad_to_multiple=4)
    assert mb.cu_seqlens.tolist() == [0, 8, 12, 24]
    assert mb.cu_seqlens_unpadded.tolist() == [0, 5, 8, 19]
    # Row 0 scores tokens 2..4, predicted at positions 1..3; row 1 starts after 8 padded tokens.
    assert mb.score_index[0, :3].tolist() == [1, 2, 3]
    assert mb.score_index[1, :2].tolist() == [8, 9]
    assert mb.targets[[1, 2, 3]].tolist() == [7, 8, 9]
    assert mb.targets[4:8].tolist() == [0, 0, 0, 0]  # the last real token predicts nothing
    params = mb.packed_seq_params()
    assert params.cu_seqlens_q_padded is mb.cu_seqlens
    assert pack(ROWS, [0, 1]).cu_seqlens_unpadded is None  # no padding: one set of lengths


def test_trailing_segment_must_keep_cp_divisibility():
    with pytest.raises(ValueError, match="pad_to_multiple=2 is not a multiple of seq_multiple=4"):
        pack(ROWS, [0], seq_multiple=4, pad_to_multiple=2)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_ranks_partition_the_pack_and_rows_sum_back(cp):
    seq_multiple, multiple = pad_multiples(cp=cp)
    # pad_to_length adds a trailing never-scored segment, split like any sequence.
    full = pack(ROWS, [0, 1, 2], seq_multiple=seq_multiple, pad_to_multiple=multiple,
                pad_to_length=30)
    per_token = torch.arange(full.num_tokens, dtype=torch.float64) + 1.0
    parts = [split_for_context_parallel(full, cp, r) for r in range(cp)]
    assert sum(p.num_tokens for p in parts) == full.num_tokens
    assert all(p.num_tokens == full.num_tokens // cp for p in parts)
    seen = torch.cat([p.input_ids for p in parts]).sort().values
    assert torch.equal(seen, full.input_ids.sort().values)
    # Each scored token is held by exactly one rank; the ranks' partial rows sum to the rows.
    assert torch.equal(sum(p.held_mask.long() for p in parts), full.score_mask.long())
    rows = sum(p.to_rows(_local(per_token, full, p, cp, r)) for r, p in enumerate(parts))
    assert torch.equal(rows, full.to_rows(per_token))
    assert all(torch.equal(p.cu_seqlens, full.cu_seqlens) for p in parts)


def _local(per_token, full, part, cp, rank):
    seq, pos = cp_token_positions(full.cu_seqlens[1:] - full.cu_seqlens[:-1], cp, rank)
    return per_token[full.cu_seqlens[:-1].long()[seq] + pos]


def test_pad_multiples_per_layout():
    assert pad_multiples() == (1, 1)
    assert pad_multiples(tp=2, sequence_parallel=True) == (1, 2)
    assert pad_multiples(tp=2, sequence_parallel=False, cp=2) == (4, 4)
    assert pad_multiples(tp=2, sequence_parallel=True, cp=2) == (8, 8)
    # FP8: each rank's local tokens (t / (CP * TP)) a multiple of 16.
    assert pad_multiples(tp=4, sequence_parallel=True, cp=2, fp8_multiple=16) == (16, 128)
    assert pad_multiples(fp8_multiple=32) == (1, 32)


def test_budget_counts_padded_lengths():
    # Lengths 5, 3, 11 pad to 8, 4, 12 under seq_multiple=4: a budget of 12 needs 2 packs.
    packs = pack_all(ROWS, 12, seq_multiple=4, pad_to_multiple=4)
    assert sorted(p.row_ids for p in packs) == [[0, 1], [2]]
    assert all(p.num_tokens <= 12 for p in packs)


def test_interleaved_schedule_count_splits_packs_then_pads_with_empty_ones():
    # Budget 100 puts all three rows in one pack; a multiple of 2 splits it (by rows), a
    # multiple of 4 then needs a padding-only pack: 3 rows cannot make 4 packs.
    two = pack_all(ROWS, 100, count_multiple=2, same_length=True)
    assert [p.row_ids for p in two] == [[0], [1, 2]]
    four = pack_all(ROWS, 100, count_multiple=4, same_length=True)
    assert sorted(p.row_ids for p in four) == [[], [0], [1], [2]]
    assert len({p.num_tokens for p in four}) == 1  # one length for pipeline p2p
    empty = next(p for p in four if not p.row_ids)
    assert empty.score_index.shape[0] == 0 and not empty.score_mask.any()
    with pytest.raises(ValueError, match="same_length=True"):
        pack_all(ROWS, 100, count_multiple=4)


def test_to_moves_every_tensor_field():
    # "meta" stands in for the GPU: every tensor (cu_seqlens included, which TransformerEngine
    # reads on the device) must move, the plain fields stay.
    mb = split_for_context_parallel(pack(ROWS, [0, 1, 2], seq_multiple=4, pad_to_multiple=4), 2, 1)
    moved = mb.to("meta")
    for name, value in vars(moved).items():
        if isinstance(value, torch.Tensor):
            assert value.device.type == "meta", name
    assert moved.row_ids == mb.row_ids and moved.max_seqlen == mb.max_seqlen


def test_masked_slots_never_leak_a_nan():
    mb = pack(ROWS, [0, 1])
    per_token = torch.zeros(mb.num_tokens)
    per_token[0] = float("nan")  # an unscored position every masked slot points at
    rows = mb.to_rows(per_token)
    assert not torch.isnan(rows[mb.score_mask]).any() and not torch.isnan(rows).any()


def test_collectives_run_on_the_cpu_without_nccl():
    from megatron_ext.parallel import collective_device

    assert collective_device() == torch.device("cpu")
