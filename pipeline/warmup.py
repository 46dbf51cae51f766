"""Supervised warm-up: next-token NLL of (prompt, reference answer) pairs before RL.

RL needs a policy that is sometimes right; a tiny model trained from scratch never is. The
warm-up trains on ``prompt + answer_text + eos`` with the loss on the answer tokens only,
token-mean over the whole batch (all DP ranks), through the same packed loss path as RL.
"""

from __future__ import annotations

import torch

from megatron_ext.packing import Row
from megatron_ext.policy_step import policy_update


def sft_rows(records, tokenizer, answer_format: str = "{answer}") -> list[Row]:
    rows = []
    for rec in records:
        text = answer_format.format(answer=rec.answer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(Row(tokens=list(rec.prompt_ids) + ids, loss_start=len(rec.prompt_ids)))
    return rows


def sft_step(model, optimizer, rows: list[Row], *, token_budget: int, dp_group,
             vocab_size: int) -> float:
    """One optimizer step of answer-token NLL; returns the batch's mean NLL (all DP ranks)."""
    import torch.distributed as dist

    from megatron_ext.parallel import collective_device

    total = torch.tensor(float(sum(r.n_scored for r in rows)), device=collective_device(dp_group))
    if dist.is_initialized():
        dist.all_reduce(total, group=dp_group)

    def loss_fn(row_ids, lp, ent, mask):
        loss = -(lp * mask).sum() / total
        return loss, {"nll": loss}

    _, metrics = policy_update(model, optimizer, rows, loss_fn, token_budget=token_budget,
                               vocab_size=vocab_size)
    nll = torch.tensor(float(metrics.get("nll", 0.0)), device=collective_device(dp_group))
    if dist.is_initialized():
        dist.all_reduce(nll, group=dp_group)
    return float(nll)
