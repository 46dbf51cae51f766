"""Advantage estimators, down-sampling rules and policy losses (specs/algorithms.md).

Pure torch math, parallel-aware through an explicit ``group`` (the DP process group) on every
function that takes a step-level statistic. Modules, one idea each:

  baselines     GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline advantages
  losses        PPO clip (clip-higher, dual clip), GSPO, NLL, KL k1/k2/k3, TIS weights
  aggregation   the four aggregation modes with step-global denominators
  dapo          dynamic-sampling filter, overlong shaping
  pods          max-variance / max-reward / random down-sampling
  copo, aapo, jepo, spro   the seed methods (advantages, loss, config)
  jepo_sequences           cut a response at the delimiter, append the reference answer
  batch, objective, grpo   the records an algorithm consumes/produces, the shared loss terms,
                           the GRPO-family config
  presets       the registry: get_preset(name, **overrides)
"""

from pipeline.algorithms.aapo import AapoConfig, aapo_advantages
from pipeline.algorithms.aggregation import (AGGREGATION_MODES, Denominators, aggregate,
                                             step_denominators)
from pipeline.algorithms.baselines import (grpo_advantages, reinforce_pp_advantages,
                                           rloo_advantages)
from pipeline.algorithms.batch import LossTerms, StepBatch
from pipeline.algorithms.copo import CopoConfig, consistency_entropy, copo_advantages, copo_loss
from pipeline.algorithms.dapo import (DynamicBatch, informative_groups, overlong_penalty,
                                      sample_informative)
from pipeline.algorithms.grpo import GrpoConfig
from pipeline.algorithms.jepo import (JepoConfig, jepo_advantages, jepo_answer_weights,
                                      jepo_bound, jepo_format_advantages, jepo_loss,
                                      jepo_normalize)
from pipeline.algorithms.jepo_sequences import (DEFAULT_DELIMITER, JepoSequence,
                                                build_jepo_sequence, delimiter_cut,
                                                pad_jepo_sequences)
from pipeline.algorithms.losses import (gspo_loss, kl_penalty, nll_loss, ppo_clip_loss,
                                        tis_weights)
from pipeline.algorithms.objective import AlgorithmConfig, finish_loss
from pipeline.algorithms.pods import (Downsample, max_reward_subset, max_variance_subset,
                                      random_subset, select_subset, subset_rows)
from pipeline.algorithms.presets import PRESETS, Algorithm, Preset, get_preset
from pipeline.algorithms.spro import (SproConfig, masked_step_advantage, spro_advantages,
                                      spro_advantages_packed)

__all__ = [
    "AGGREGATION_MODES", "AapoConfig", "Algorithm", "AlgorithmConfig", "CopoConfig",
    "DEFAULT_DELIMITER", "Denominators", "Downsample", "DynamicBatch", "GrpoConfig",
    "JepoConfig", "JepoSequence", "LossTerms", "PRESETS", "Preset", "SproConfig", "StepBatch",
    "aapo_advantages", "aggregate", "build_jepo_sequence", "consistency_entropy",
    "copo_advantages", "copo_loss", "delimiter_cut", "finish_loss", "get_preset",
    "grpo_advantages", "gspo_loss", "informative_groups", "jepo_advantages",
    "jepo_answer_weights", "jepo_bound", "jepo_format_advantages", "jepo_loss",
    "jepo_normalize", "kl_penalty", "masked_step_advantage", "max_reward_subset",
    "max_variance_subset", "nll_loss", "overlong_penalty", "pad_jepo_sequences",
    "ppo_clip_loss", "random_subset", "reinforce_pp_advantages", "rloo_advantages",
    "sample_informative", "select_subset", "spro_advantages", "spro_advantages_packed",
    "step_denominators", "subset_rows", "tis_weights",
]
