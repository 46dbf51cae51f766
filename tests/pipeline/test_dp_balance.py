"""Token balancing across DP ranks: whole groups swapped, counts per rank kept."""

from megatron_ext.multirank import run_ranks
from megatron_ext.packing import balance_by_swaps


def test_swaps_even_out_loads_with_few_moves():
    # Rank 0 holds 100 + 90 = 190 tokens, rank 1 holds 10 + 20 = 30: gap 160, so the ideal
    # swap moves d = 80 tokens. 100<->20 and 90<->10 both do; the first found wins, giving
    # 20 + 90 = 110 and 10 + 100 = 110 after one swap.
    held = balance_by_swaps([[100, 90], [10, 20]])
    assert held == [[(1, 1), (0, 1)], [(1, 0), (0, 0)]]


def test_a_lighter_rank_is_tried_when_the_lightest_cannot_swap():
    # Heaviest A = 10 + 10 = 20. Lightest B = 10 + 0: swapping 10<->0 moves the whole gap (10)
    # and 10<->10 moves nothing, so no swap with B helps. C = 6 + 7 = 13 (gap 7): 10<->6 and
    # 10<->7 leave a gap of 1 either way; the smaller indices win: A = 6 + 10, C = 10 + 7.
    # Then the heaviest, C (17), has no helpful swap with B (10) or A (16): done, max 20 -> 17.
    held = balance_by_swaps([[10, 10], [10, 0], [6, 7]])
    assert held == [[(2, 0), (0, 1)], [(1, 0), (1, 1)], [(0, 0), (2, 1)]]


def test_balanced_input_is_left_alone():
    assert balance_by_swaps([[5, 7], [6, 6]]) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]


def test_every_group_kept_once_and_counts_unchanged():
    tokens = [[300, 280, 260, 240], [20, 30, 40, 50], [100, 110, 120, 130]]
    held = balance_by_swaps(tokens)
    assert sorted(g for slots in held for g in slots) == sorted(
        (r, i) for r, ts in enumerate(tokens) for i in range(len(ts)))
    assert [len(s) for s in held] == [4, 4, 4]
    loads = [sum(tokens[r][i] for r, i in slots) for slots in held]
    assert max(loads) - min(loads) <= 40  # from 1080 vs 140 before
    assert max(loads) < 1080


def test_groups_stay_in_their_mini_batch():
    # updates=2: rank 0's blocks are [60, 40] and [10, 10], rank 1's [10, 10] and [30, 30].
    # Block 0 (100 vs 20, gap 80): 60<->10 -> 50 vs 70; then no swap narrows 20. Block 1
    # (20 vs 60, gap 40): 30<->10 -> 40 vs 40. Each group keeps its block.
    from pipeline.dp_balance import _balance_blocks

    held, before, after = _balance_blocks([[60, 40, 10, 10], [10, 10, 30, 30]], 2)
    assert held == [[(1, 0), (0, 1), (1, 2), (0, 3)], [(0, 0), (1, 1), (0, 2), (1, 3)]]
    assert abs(before - (100 / 60 + 60 / 40) / 2) < 1e-12
    assert abs(after - (70 / 60 + 1.0) / 2) < 1e-12


class _G:
    def __init__(self, name, prompt, responses):
        self.name, self.prompt_ids, self.responses = name, prompt, responses


def _exchange_job(rank, world_size):
    from pipeline.dp_balance import balance_over_dp

    if rank == 0:
        groups = [_G("a", [1] * 4, [[2] * 40, [2] * 36]), _G("b", [1] * 4, [[2] * 30] * 2)]
    else:
        groups = [_G("c", [1] * 4, [[2] * 2] * 2), _G("d", [1] * 4, [[2] * 6] * 2)]
    out, stats = balance_over_dp(groups, None if world_size == 1 else _world())
    return [g.name for g in out], stats


def _world():
    import torch.distributed as dist

    return dist.group.WORLD


def test_groups_travel_between_dp_ranks():
    # Tokens: a=84, b=68 on rank 0 (152); c=12, d=20 on rank 1 (32); gap 120, ideal d = 60.
    # a<->d (64) and b<->c (56) both leave a gap of 8; a<->d is found first: 88 / 96. No
    # further swap narrows a gap of 8, so that is the result.
    (names0, stats), (names1, _) = run_ranks(_exchange_job, 2, timeout=120)
    assert names0 == ["d", "b"] and names1 == ["c", "a"]
    assert abs(stats["dp_token_imbalance_before"] - 152 / 92) < 1e-9
    assert abs(stats["dp_token_imbalance_after"] - 96 / 92) < 1e-9
