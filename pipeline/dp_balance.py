"""Even out the step's tokens across data-parallel ranks after rollout.

Each DP replica generates its own share of prompts, so one rank may get the long responses and
make every other rank wait at the gradient all-reduce. Whole groups (a prompt and all its
responses: advantages are per group) are swapped between ranks by
:func:`megatron_ext.packing.balance_by_swaps`; group counts per rank stay the same, so
mini-batch splits and the step-global denominators are unchanged.

Only the token counts go to every rank; the groups that change rank travel once, gathered over
the DP group among the ranks at the same TP/CP/PP coordinates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.packing import balance_by_swaps


def group_tokens(group) -> int:
    """Tokens a group costs the trainer: prompt + response for every sample."""
    return sum(len(group.prompt_ids) + len(r) for r in group.responses)


def balance_over_dp(groups: list, dp_group) -> tuple[list, dict[str, float]]:
    """This DP rank's groups after balancing, and ``{"dp_token_imbalance_before", "..._after"}``
    (heaviest rank's tokens / mean; 1.0 is perfect). Identity when DP is 1."""
    world = dist.get_world_size(dp_group) if dp_group is not None else 1
    mine = [group_tokens(g) for g in groups]
    if world == 1:
        return groups, {"dp_token_imbalance_before": 1.0, "dp_token_imbalance_after": 1.0}
    counts = torch.tensor([len(groups)], dtype=torch.long)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, counts, group=dp_group)
    width = max(int(s) for s in sizes)
    padded = torch.full((width,), -1, dtype=torch.long)
    padded[:len(mine)] = torch.tensor(mine, dtype=torch.long)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=dp_group)
    tokens = [[int(t) for t in p[:int(n)]] for p, n in zip(parts, sizes)]
    held = balance_by_swaps(tokens)
    me = dist.get_rank(dp_group)
    leaving = {i: groups[i] for r, slots in enumerate(held) if r != me
               for (src, i) in slots if src == me}
    gathered = [None] * world
    dist.all_gather_object(gathered, leaving, group=dp_group)
    out = [groups[i] if src == me else gathered[src][i] for src, i in held[me]]
    before = [sum(t) for t in tokens]
    after = [sum(tokens[src][i] for src, i in slots) for slots in held]
    mean = sum(before) / world
    return out, {"dp_token_imbalance_before": max(before) / max(mean, 1e-9),
                 "dp_token_imbalance_after": max(after) / max(mean, 1e-9)}
