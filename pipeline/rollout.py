"""Rollout for one step on one data-parallel rank: generate, reward, refill, down-sample.

Runs on the rank's model-parallel leader (the one that owns the engine client); the result is
broadcast to the other ranks of its model-parallel group by the trainer. Groups are
prompt-major: row ``j*G + i`` is response i of prompt j.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.engine import SamplingParams


@dataclass
class Group:
    """One prompt and its sampled responses (before or after PODS selection)."""

    prompt_ids: list[int]
    prompt_text: str
    answer: str | None
    index: int  # dataset row
    responses: list[list[int]]
    rollout_logprobs: list[list[float]]
    texts: list[str]
    finish_reasons: list[str]
    weight_versions: list[int]
    rewards: list[float]
    correct: list[bool]
    answer_ids: list[int] | None = None
    ref_rewards: list[float] | None = None  # AAPO: paired samples of the frozen policy

    def take(self, cols: list[int]) -> "Group":
        pick = lambda xs: None if xs is None else [xs[c] for c in cols]  # noqa: E731
        return Group(self.prompt_ids, self.prompt_text, self.answer, self.index,
                     pick(self.responses), pick(self.rollout_logprobs), pick(self.texts),
                     pick(self.finish_reasons), pick(self.weight_versions), pick(self.rewards),
                     pick(self.correct), pick(self.answer_ids), pick(self.ref_rewards))


@dataclass
class RolloutResult:
    groups: list[Group]
    metrics: dict[str, float] = field(default_factory=dict)  # sums and counts, this rank
    reward_counters: dict[str, int] = field(default_factory=dict)


def sampling_params(rollout_cfg, *, seed: int, max_new_tokens: int | None = None,
                    temperature: float | None = None, greedy: bool = False) -> SamplingParams:
    r = rollout_cfg
    return SamplingParams(
        max_new_tokens=max_new_tokens or r.max_new_tokens,
        temperature=0.0 if greedy else (r.temperature if temperature is None else temperature),
        top_p=1.0 if greedy else r.top_p, top_k=-1 if greedy else r.top_k,
        stop=tuple(r.stop), stop_token_ids=tuple(r.stop_token_ids), seed=seed)


def generate_groups(engine, tokenizer, scorer, records, n: int, sampling: SamplingParams
                    ) -> tuple[list[Group], dict[str, int]]:
    """Sample ``n`` responses per record and reward them."""
    comps = engine.generate([r.prompt_ids for r in records], n, sampling)
    texts, answers, prompts, lengths = [], [], [], []
    for rec, group in zip(records, comps):
        for c in group:
            texts.append(tokenizer.decode(c.token_ids, skip_special_tokens=True))
            answers.append(rec.answer)
            prompts.append(rec.prompt_text)
            lengths.append(len(c.token_ids))
    res = scorer.score(texts, answers, prompts, group_size=n,
                       extras=[dict(rec.extra) for rec in records for _ in range(n)])
    groups = []
    for j, (rec, group) in enumerate(zip(records, comps)):
        s = slice(j * n, (j + 1) * n)
        groups.append(Group(
            prompt_ids=list(rec.prompt_ids), prompt_text=rec.prompt_text, answer=rec.answer,
            index=rec.index, responses=[list(c.token_ids) for c in group],
            rollout_logprobs=[list(c.logprobs) for c in group], texts=texts[s],
            finish_reasons=[c.finish_reason for c in group],
            weight_versions=[c.weight_version for c in group], rewards=res.rewards[s],
            correct=res.correct[s], answer_ids=None if res.answer_ids is None else res.answer_ids[s]))
    return groups, res.counters


def rollout_step(*, engine, tokenizer, scorer, next_records, algo, rollout_cfg, seed: int,
                 ref_engine=None) -> RolloutResult:
    """This rank's groups for one step.

    ``next_records()`` returns the next batch of this rank's prompt records (the first call is
    the step's own batch; more calls only for DAPO dynamic sampling). ``ref_engine``: AAPO's
    frozen initial policy.
    """
    n = rollout_cfg.n_samples
    counters: dict[str, int] = {}
    metrics: dict[str, float] = {}
    rounds = 0

    def draw():
        nonlocal rounds
        records = next_records()
        params = sampling_params(rollout_cfg, seed=seed * 1000 + rounds)
        rounds += 1
        groups, c = generate_groups(engine, tokenizer, scorer, records, n, params)
        for k, v in c.items():
            counters[k] = counters.get(k, 0) + v
        return torch.tensor([g.rewards for g in groups], dtype=torch.float64), groups

    rewards, groups = draw()
    target = len(groups)
    if getattr(algo.config, "dynamic_sampling", False):
        from pipeline.algorithms import informative_groups

        pool_kept = [g for g, ok in zip(groups, informative_groups(rewards).tolist()) if ok]
        pool_flat = [g for g, ok in zip(groups, informative_groups(rewards).tolist()) if not ok]
        max_rounds = max(1, getattr(algo.config, "max_sampling_rounds", rollout_cfg.max_resample_rounds))
        while len(pool_kept) < target and rounds < max_rounds:
            r2, g2 = draw()
            keep = informative_groups(r2).tolist()
            pool_kept += [g for g, ok in zip(g2, keep) if ok]
            pool_flat += [g for g, ok in zip(g2, keep) if not ok]
        metrics["dynamic_sampling_rounds"] = rounds
        metrics["dynamic_sampling_short"] = float(len(pool_kept) < target)
        # A short batch is topped up with degenerate groups (advantage 0) so every DP rank
        # keeps the same number of groups and mini-batches.
        groups = (pool_kept + pool_flat)[:target]
    for k, v in _reward_sums(groups, "full").items():
        metrics[k] = v

    if ref_engine is not None:
        params = sampling_params(rollout_cfg, seed=seed * 1000 + 999)
        ref_groups, _ = generate_groups(ref_engine, tokenizer, scorer,
                                        [_Rec(g) for g in groups], n, params)
        for g, rg in zip(groups, ref_groups):
            g.ref_rewards = list(rg.rewards)

    cols = algo.select(torch.tensor([g.rewards for g in groups], dtype=torch.float64))
    if cols is not None:
        groups = [g.take(c) for g, c in zip(groups, cols.tolist())]
    for k, v in _reward_sums(groups, "kept").items():
        metrics[k] = v
    return RolloutResult(groups=groups, metrics=metrics, reward_counters=counters)


class _Rec:
    """A group's prompt as a data record (for the AAPO reference rollout)."""

    def __init__(self, g: Group):
        self.prompt_ids, self.prompt_text, self.answer = g.prompt_ids, g.prompt_text, g.answer
        self.index, self.extra = g.index, {}


def _reward_sums(groups: list[Group], tag: str) -> dict[str, float]:
    """Sums and counts (reduced over DP by the trainer, then divided)."""
    rewards = [r for g in groups for r in g.rewards]
    correct = [c for g in groups for c in g.correct]
    lengths = [len(x) for g in groups for x in g.responses]
    return {f"reward_sum_{tag}": float(sum(rewards)), f"correct_sum_{tag}": float(sum(correct)),
            f"responses_{tag}": float(len(rewards)), f"length_sum_{tag}": float(sum(lengths))}
