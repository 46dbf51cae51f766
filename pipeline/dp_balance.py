"""Even out the step's tokens across data-parallel ranks after rollout.

Each DP replica generates its own share of prompts, so one rank may get the long responses and
make every other rank wait at the gradient all-reduce. Whole groups (a prompt and all its
responses: advantages are per group) are swapped between ranks by
:func:`megatron_ext.packing.balance_by_swaps`, separately within each mini-batch (the
``updates`` consecutive blocks of a rank's groups that the trainer steps on one after the other):
every optimizer step is a synchronisation point, and a group keeps its mini-batch, so group
counts per rank and per mini-batch and the mini-batches' denominators are unchanged.

Only the token counts go to every rank; the groups that change rank travel once, gathered over
the DP group among the ranks at the same TP/CP/PP coordinates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.packing import balance_by_swaps
from megatron_ext.parallel import collective_device


def group_tokens(group) -> int:
    """Tokens a group costs the trainer: prompt + response for every sample."""
    return sum(len(group.prompt_ids) + len(r) for r in group.responses)


def balance_over_dp(groups: list, dp_group, updates: int = 1) -> tuple[list, dict[str, float]]:
    """This DP rank's groups after balancing each of its ``updates`` mini-batches, and
    ``{"dp_token_imbalance_before", "..._after"}``: the mean over mini-batches of the heaviest
    rank's tokens / the mean rank's (1.0 is perfect). Identity when DP is 1."""
    world = dist.get_world_size(dp_group) if dp_group is not None else 1
    mine = [group_tokens(g) for g in groups]
    if world == 1:
        return groups, {"dp_token_imbalance_before": 1.0, "dp_token_imbalance_after": 1.0}
    dev = collective_device(dp_group)
    counts = torch.tensor([len(groups)], dtype=torch.long, device=dev)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
    dist.all_gather(sizes, counts, group=dp_group)
    width = max(int(s) for s in sizes)
    padded = torch.full((width,), -1, dtype=torch.long, device=dev)
    padded[:len(mine)] = torch.tensor(mine, dtype=torch.long, device=dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=dp_group)
    tokens = [[int(t) for t in p[:int(n)]] for p, n in zip(parts, sizes)]
    held, before, after = _balance_blocks(tokens, updates)
    me = dist.get_rank(dp_group)
    leaving = {i: groups[i] for r, slots in enumerate(held) if r != me
               for (src, i) in slots if src == me}
    gathered = [None] * world
    dist.all_gather_object(gathered, leaving, group=dp_group)
    out = [groups[i] if src == me else gathered[src][i] for src, i in held[me]]
    return out, {"dp_token_imbalance_before": before, "dp_token_imbalance_after": after}


def _balance_blocks(tokens: list[list[int]], updates: int):
    """balance_by_swaps within each mini-batch block (rank r's block u: its slots
    ``[u * per_r, (u + 1) * per_r)`` with ``per_r = len(tokens[r]) // updates``, as the trainer
    cuts them; slots past the last block stay). Returns (held, imbalance before, after)."""
    held = [[(r, i) for i in range(len(ts))] for r, ts in enumerate(tokens)]
    ratios_before, ratios_after = [], []
    for u in range(updates):
        spans = [range(u * (len(ts) // updates), (u + 1) * (len(ts) // updates)) for ts in tokens]
        block = [[tokens[r][i] for i in span] for r, span in enumerate(spans)]
        moved = balance_by_swaps(block)
        for r, span in enumerate(spans):
            for slot, (src, k) in zip(span, moved[r]):
                held[r][slot] = (src, spans[src][k])
        loads = [sum(b) for b in block]
        mean = max(sum(loads) / len(loads), 1e-9)
        ratios_before.append(max(loads) / mean)
        ratios_after.append(max(sum(block[src][k] for src, k in slots) for slots in moved) / mean)
    return held, sum(ratios_before) / updates, sum(ratios_after) / updates
