"""The algorithm registry: a config says ``algorithm: copo`` plus field overrides and gets the
estimator and loss to call (issue 3, "Presets").

A trainer's step, for every algorithm::

    algo = get_preset("copo", gamma=20.0, downsample="max_variance")
    kept = algo.select(rewards)              # PODS: [P,m] columns, or None; keep those rows
    terms = algo.advantages(step, group=dp)  # StepBatch of the kept rows -> LossTerms
    denom = algo.denominators(terms, group=dp)   # once per mini-batch, before micro-batches
    for mb in micro_batches:                 # row index of each micro-batch
        loss, metrics = algo.loss(logprobs_mb, terms.rows(mb), denom, entropy=entropy_mb)

Losses and metrics are shares: they SUM over micro-batches and DP ranks to the step value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.algorithms import aapo, copo, grpo, jepo, spro
from pipeline.algorithms.aggregation import Denominators, step_denominators
from pipeline.algorithms.batch import LossTerms, StepBatch
from pipeline.algorithms.objective import AlgorithmConfig
from pipeline.algorithms.pods import Downsample, select_subset


@dataclass(frozen=True)
class Preset:
    """A registry entry: the config class, the preset's defaults, the estimator and the loss."""

    config_class: type[AlgorithmConfig]
    defaults: dict[str, Any]
    estimate: Callable[..., LossTerms]
    loss: Callable[..., tuple[Tensor, dict[str, Tensor]]]


PRESETS: dict[str, Preset] = {
    # DeepSeekMath's GRPO: per-sequence mean, k3 KL with beta 0.04.
    "grpo": Preset(grpo.GrpoConfig, dict(aggregation="seq-mean-token-mean", kl_coef=0.04),
                   grpo.estimate, grpo.loss),
    # Dr. GRPO: no std division, no per-sequence length normalisation, no KL.
    "dr_grpo": Preset(grpo.GrpoConfig, dict(scale=False, aggregation="seq-mean-token-sum-norm"),
                      grpo.estimate, grpo.loss),
    "rloo": Preset(grpo.GrpoConfig, dict(baseline="rloo"), grpo.estimate, grpo.loss),
    "reinforce_pp": Preset(grpo.GrpoConfig, dict(baseline="reinforce_pp"), grpo.estimate,
                           grpo.loss),
    # DAPO: Clip-Higher, token-mean, dynamic sampling, overlong shaping (paper: 20480/4096;
    # set overlong_max_len to the rollout's max_new_tokens).
    "dapo": Preset(grpo.GrpoConfig, dict(eps_high=0.28, dynamic_sampling=True,
                                         overlong_max_len=20480, overlong_cache_len=4096),
                   grpo.estimate, grpo.loss),
    "gspo": Preset(grpo.GrpoConfig, dict(ratio="sequence", eps_low=3e-4, eps_high=4e-4,
                                         aggregation="seq-mean-token-mean"),
                   grpo.estimate, grpo.loss),
    # PODS: GRPO on the max-variance m of n (n = 4m), eps 1e-4 on the subset.
    "pods": Preset(grpo.GrpoConfig, dict(eps=1e-4, downsample=Downsample(),
                                         aggregation="seq-mean-token-mean", kl_coef=0.04),
                   grpo.estimate, grpo.loss),
    "copo": Preset(copo.CopoConfig, {}, copo.estimate, copo.loss),
    "aapo": Preset(aapo.AapoConfig, {}, aapo.estimate, aapo.loss),
    "jepo": Preset(jepo.JepoConfig, {}, jepo.estimate, jepo.loss),
    "spro": Preset(spro.SproConfig, {}, spro.estimate, spro.loss),
}


@dataclass(frozen=True)
class Algorithm:
    """A configured algorithm: its name, config, and the four calls a trainer makes."""

    name: str
    config: AlgorithmConfig
    preset: Preset

    def select(self, rewards: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """[P,n] rewards of every rollout -> LongTensor[P,m] columns to keep (PODS), or None
        when the config does not down-sample. Log full-group reward metrics before calling."""
        ds = self.config.downsample
        if ds is None:
            return None
        return select_subset(rewards, ds.keep, ds.rule, generator)

    def advantages(self, step: StepBatch, group: dist.ProcessGroup | None = None) -> LossTerms:
        """This rank's StepBatch -> LossTerms; ``group``: the DP group of step statistics."""
        return self.preset.estimate(self.config, step, group)

    def denominators(self, terms: LossTerms, group: dist.ProcessGroup | None = None
                     ) -> Denominators:
        """The mini-batch's LossTerms (this rank) -> its step-global loss denominators."""
        return step_denominators(terms.loss_mask, group)

    def loss(self, logprobs: Tensor, terms: LossTerms, denominators: Denominators,
             entropy: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """[B,T] logprobs (grad) of a micro-batch, its LossTerms rows -> (loss share, metrics)."""
        return self.preset.loss(self.config, logprobs, terms, denominators, entropy)


def get_preset(name: str, **overrides: Any) -> Algorithm:
    """Algorithm name + field overrides -> the configured :class:`Algorithm`.

    ``downsample`` composes PODS with any algorithm and accepts a :class:`Downsample`, a dict
    of its fields, a rule name (``"max_variance"``), or None to turn it off.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown algorithm {name!r}; valid names: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    known = {f.name for f in fields(preset.config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{name} has no field {', '.join(unknown)}; its fields are: "
                         f"{', '.join(sorted(known))}")
    values = {**preset.defaults, **overrides}
    if "downsample" in values:
        values["downsample"] = _as_downsample(values["downsample"])
    return Algorithm(name=name, config=preset.config_class(**values), preset=preset)


def _as_downsample(value: Any) -> Downsample | None:
    if value is None or isinstance(value, Downsample):
        return value
    if isinstance(value, str):
        return Downsample(rule=value)
    if isinstance(value, dict):
        unknown = sorted(set(value) - {f.name for f in fields(Downsample)})
        if unknown:
            raise ValueError(f"downsample has no field {', '.join(unknown)}; its fields are: "
                             f"rule, keep")
        return Downsample(**value)
    raise ValueError(f"downsample must be a Downsample, a dict of its fields, a rule name or "
                     f"None; got {value!r}")
