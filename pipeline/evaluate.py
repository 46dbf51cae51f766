"""Held-out evaluation: mean@k, pass@k and maj@k of a rollout engine on a prompt set.

mean@k: the mean reward over k samples of a prompt; pass@k: 1 if any of the k is correct;
maj@k: 1 if the most common answer key among the k (ties: first seen) belongs to a correct
sample. Each is averaged over prompts. With ``greedy`` and k = 1 all three coincide with
greedy accuracy.
"""

from __future__ import annotations

from collections import Counter

from pipeline.rollout import generate_groups, sampling_params


def eval_records(cfg, tokenizer) -> list:
    from pipeline.data import PromptDataset

    ds = PromptDataset(cfg.eval.data, tokenizer)
    out = []
    for rec in ds.records():
        out.append(rec)
        if len(out) >= cfg.eval.num_prompts:
            break
    return out


def evaluate_replica(engine, tokenizer, scorer, cfg, *, dp_rank: int = 0, dp: int = 1,
                     seed: int = 0, records=None) -> dict[str, float]:
    """Sums over this DP rank's share of the eval prompts (divide by ``prompts``)."""
    ev = cfg.eval
    records = eval_records(cfg, tokenizer) if records is None else records
    mine = records[dp_rank::dp]
    sums = {"prompts": 0.0, "mean_at_k": 0.0, "pass_at_k": 0.0, "maj_at_k": 0.0,
            "response_length": 0.0}
    if not mine:
        return sums
    params = sampling_params(cfg.rollout, seed=seed, greedy=ev.greedy,
                             max_new_tokens=ev.max_new_tokens, temperature=ev.temperature)
    groups, _ = generate_groups(engine, tokenizer, scorer, mine, ev.k, params)
    for g in groups:
        sums["prompts"] += 1
        sums["mean_at_k"] += sum(g.rewards) / len(g.rewards)
        sums["pass_at_k"] += float(any(g.correct))
        sums["response_length"] += sum(len(r) for r in g.responses) / len(g.responses)
        keys = [k for k in (g.answer_ids or []) if k is not None and k >= 0]
        if keys:
            top = Counter(keys).most_common(1)[0][0]
            sums["maj_at_k"] += float(any(c for c, k in zip(g.correct, g.answer_ids) if k == top))
    return sums
