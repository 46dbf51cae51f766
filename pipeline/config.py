"""The job config: one dataclass per concern, read from YAML with dotted overrides, validated
before any process group starts (:func:`validate`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from megatron_ext.model import ModelConfig
from megatron_ext.parallel import ParallelConfig
from megatron_ext.train import OptimizerConfig
from pipeline.config_io import ConfigError, dump, load
from pipeline.data.config import DataConfig
from pipeline.rewards import RewardConfig

log = logging.getLogger("groupwise")


@dataclass
class RolloutConfig:
    """How completions are produced. ``engine``: ``embedded`` (transformers, in process: the
    CPU default), ``sglang`` (launch SGLang servers + router), or ``http`` (already running
    SGLang-protocol workers at ``urls``, e.g. ``groupwise serve``, optionally behind an
    sglang-router at ``router_url``).

    With ``http`` and data-parallel size ``dp`` > 1, ``urls`` is split into ``dp`` equal
    contiguous shares and each DP leader pushes weights to its own share only, so every server
    is updated exactly once per sync (see :mod:`pipeline.engines`)."""

    engine: str = "embedded"
    prompts_per_step: int = 16
    n_samples: int = 8  # responses per prompt (PODS: n, before down-sampling)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int = 0
    batch_size: int = 64  # embedded engine: rows decoded together
    urls: list[str] = field(default_factory=list)  # engine=http: worker addresses (not a router)
    # engine=http, algorithm aapo: servers of the frozen reference policy (never updated)
    ref_urls: list[str] = field(default_factory=list)
    router_url: str | None = None  # engine=http: an sglang-router in front of the workers
    # engine=sglang (and engine=http's Slurm-launched servers): ServerConfig fields, passed through
    sglang: dict[str, Any] = field(default_factory=dict)
    # engine=sglang/http: inference.weight_sync.WeightSyncConfig fields, e.g. {transport: disk,
    # disk_dir: /shared/x}; transport tensor (default) | distributed | disk. The embedded engine
    # loads weights in process and rejects this section.
    weight_sync: dict[str, Any] = field(default_factory=dict)
    max_resample_rounds: int = 3  # DAPO dynamic sampling: extra generation rounds per step
    weight_bucket_mb: int = 64  # weight-sync bucket size
    # Generate step t+1 while step t trains (one-step off-policy; set algorithm.tis). A resumed
    # run regenerates the prefetched step, so resume is exact only without overlap.
    off_policy_overlap: bool = False


@dataclass
class TrainerConfig:
    steps: int = 100
    updates_per_step: int = 1  # mini-batches (optimizer steps) per rollout step
    micro_batch_tokens: int = 4096  # token budget of one packed micro-batch
    logprob_chunk_tokens: int | None = None  # vocab-parallel log-prob chunk (None: auto)
    seed: int = 1234
    warmup_sft_steps: int = 0  # supervised warm-up on (prompt, answer) before RL
    warmup_sft_lr: float = 1e-3
    warmup_sft_batch: int = 64
    warmup_answer_format: str = "{answer}"  # the supervised target text, e.g. "#{answer}"


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default: <logging.run_dir>/checkpoints
    every_steps: int = 0  # 0: only at the end (and on SIGTERM)
    keep_last: int = 2
    resume: bool = False  # continue from the latest checkpoint in `dir` when there is one
    export_hf: bool = True  # write a Hugging Face checkpoint at the end


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    progress_bar: bool = True
    tensorboard: bool = False
    wandb_project: str | None = None
    plot: bool = True  # render reward/length/entropy/KL curves at the end


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: never during training
    data: DataConfig | None = None
    num_prompts: int = 64
    k: int = 1  # samples per prompt: mean@k, pass@k, maj@k
    greedy: bool = True
    temperature: float = 1.0
    max_new_tokens: int | None = None  # default: rollout.max_new_tokens


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: dict[str, Any] = field(default_factory=lambda: {"name": "grpo"})
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_job_config(path: str | None, overrides: list[str] | None = None) -> JobConfig:
    cfg = load(JobConfig, path, overrides)
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    # Paths in a config file are relative to that file, so examples run from anywhere.
    if isinstance(cfg.model.hf_config, str):
        cfg.model.hf_config = _resolve(base, cfg.model.hf_config)
    cfg.data.paths = [_resolve(base, p) for p in cfg.data.paths]
    if cfg.eval.data is not None:
        cfg.eval.data.paths = [_resolve(base, p) for p in cfg.eval.data.paths]
    return cfg


def _resolve(base: str, p: str) -> str:
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def sglang_arg(cfg: JobConfig, name: str) -> str | None:
    """The value of SGLang server option ``--name`` in ``rollout.sglang.extra_args`` (the
    options passed through to ``sglang.launch_server``), or None."""
    args = [str(a) for a in cfg.rollout.sglang.get("extra_args") or []]
    flag = "--" + name.replace("_", "-")
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def rollout_fp8(cfg: JobConfig) -> bool:
    """The SGLang servers hold FP8 weights (``--quantization fp8``, ``w8a8_fp8``, ...); the
    embedded engine never quantizes."""
    return cfg.rollout.engine != "embedded" and "fp8" in (sglang_arg(cfg, "quantization") or "")


def precision_mismatch(cfg: JobConfig) -> str | None:
    """Why the rollout engine and the trainer compute in different precisions (FP8 on one
    side only), or None when they agree."""
    train_fp8, roll_fp8 = cfg.model.fp8 is not None, rollout_fp8(cfg)
    if train_fp8 == roll_fp8:
        return None
    if roll_fp8:
        return (f"the rollout servers run fp8 (--quantization {sglang_arg(cfg, 'quantization')} in "
                f"rollout.sglang.extra_args) and the trainer {cfg.model.params_dtype} (model.fp8: null)")
    return (f"the trainer runs fp8 (model.fp8={cfg.model.fp8}) and the rollout engine does not "
            f"(no fp8 --quantization in rollout.sglang.extra_args)")


_announced: set[str] = set()


def _announce_once(message: str) -> None:
    if message not in _announced:
        _announced.add(message)
        log.warning(message)


def algorithm_of(cfg: JobConfig):
    """The configured :class:`pipeline.algorithms.Algorithm` (errors name ``algorithm.*``).

    When rollout and training precisions differ (:func:`precision_mismatch`) and the config
    does not set ``algorithm.tis``, TIS is turned on (``truncate`` at the preset's ``tis_cap``)
    to correct the engine/trainer mismatch; ``algorithm.tis: null`` keeps it off."""
    from pipeline.algorithms import get_preset

    params = dict(cfg.algorithm)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("algorithm.name is required (grpo, dr_grpo, rloo, dapo, gspo, pods, "
                          "copo, aapo, jepo, spro)")
    try:
        algo = get_preset(name, **params)
        reason = precision_mismatch(cfg)
        if reason is not None and "tis" not in params and algo.config.tis is None:
            algo = get_preset(name, **params, tis="truncate")
            _announce_once(f"algorithm.tis=truncate (tis_cap {algo.config.tis_cap:g}) turned on: "
                           f"{reason}; set algorithm.tis: null to keep it off")
        return algo
    except (TypeError, ValueError) as e:
        raise ConfigError(f"algorithm: {e}") from None


def validate(cfg: JobConfig, world_size: int, *, runtime: bool = True,
             capability: tuple[int, int] | None = None) -> dict[str, int]:
    """Check everything that can be checked before launch; returns derived sizes (dp, ...).

    ``runtime=False`` skips only the checks about this machine (TransformerEngine importable,
    its CUDA capability), so ``groupwise plan`` validates an FP8 config from a CPU machine;
    ``capability`` is then the target GPU's compute capability (None: not checked)."""
    from megatron_ext.model import load_hf_config, validate_model_layout

    par = cfg.parallel
    for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
        if getattr(par, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1")
    try:
        dp = par.data_parallel(world_size)
    except ValueError as e:
        raise ConfigError(f"parallel: {e}") from None
    if cfg.model.hf_config is None:
        raise ConfigError("model.hf_config is required: a Hugging Face model directory")
    try:
        hf = load_hf_config(cfg.model.hf_config)
        validate_model_layout(hf, cfg.model, tp=par.tensor_parallel, pp=par.pipeline_parallel,
                              cp=par.context_parallel, vpp=par.virtual_pipeline,
                              sequence_parallel=par.sequence_parallel,
                              use_te=None if runtime else True, capability=capability)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    algo = algorithm_of(cfg)
    r = cfg.rollout
    if r.engine not in ("embedded", "sglang", "http"):
        raise ConfigError(f"rollout.engine={r.engine!r}: expected embedded, sglang or http")
    if r.engine == "http" and not r.urls:
        raise ConfigError("rollout.engine=http needs rollout.urls (the workers' addresses; a "
                          "router in front of them goes in rollout.router_url)")
    _validate_engine_options(cfg, algo.name, dp)
    if r.n_samples < 1 or r.prompts_per_step < 1:
        raise ConfigError("rollout.n_samples and rollout.prompts_per_step must be >= 1")
    if r.prompts_per_step % dp:
        raise ConfigError(f"rollout.prompts_per_step={r.prompts_per_step} is not divisible by the "
                          f"data-parallel size {dp}: every DP rank takes whole groups")
    per_rank = r.prompts_per_step // dp
    if per_rank % cfg.trainer.updates_per_step:
        raise ConfigError(f"trainer.updates_per_step={cfg.trainer.updates_per_step} does not divide "
                          f"the {per_rank} prompts each DP rank holds per step (prompts_per_step/dp)")
    ds = algo.config.downsample
    if ds is not None and ds.keep > r.n_samples:
        raise ConfigError(f"algorithm.downsample.keep={ds.keep} > rollout.n_samples={r.n_samples}: "
                          "PODS keeps m of n rollouts, so m must not exceed n")
    if algo.name == "jepo" and not cfg.data.answer_field:
        raise ConfigError("algorithm jepo needs reference answers: set data.answer_field")
    if cfg.trainer.micro_batch_tokens < 1:
        raise ConfigError("trainer.micro_batch_tokens must be >= 1")
    if not cfg.data.paths:
        raise ConfigError("data.paths is empty: give at least one jsonl/parquet/arrow file")
    try:
        cfg.data.validate()
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    return {"dp": dp, "prompts_per_rank": per_rank}


def _validate_engine_options(cfg: JobConfig, algo_name: str, dp: int) -> None:
    """The passthrough sections and the server lists of the rollout engines."""
    from pipeline.engines import server_config, weight_sync_config

    r = cfg.rollout
    if r.sglang or r.engine == "sglang":
        server_config(cfg, model_path="")
    if r.engine == "embedded":
        if r.weight_sync:
            raise ConfigError("rollout.weight_sync selects how weights reach SGLang servers "
                              "(rollout.engine=sglang or http); the embedded engine loads them in "
                              "process: remove rollout.weight_sync")
    else:
        weight_sync_config(cfg)
    if r.ref_urls and (r.engine != "http" or algo_name != "aapo"):
        raise ConfigError("rollout.ref_urls names the reference servers of algorithm aapo with "
                          f"rollout.engine=http (here: {algo_name}, engine={r.engine}); remove it")
    if r.engine != "http":
        return
    if algo_name == "aapo" and not r.ref_urls:
        raise ConfigError("algorithm aapo with rollout.engine=http needs rollout.ref_urls: the "
                          "frozen reference policy must run on its own servers (those at "
                          "rollout.urls receive the policy's weight updates)")
    shared = sorted(set(r.urls) & set(r.ref_urls))
    if shared:
        raise ConfigError(f"rollout.ref_urls and rollout.urls share {', '.join(shared)}: the "
                          "reference servers must never receive the policy's weights")
    for name, urls in (("urls", r.urls), ("ref_urls", r.ref_urls)):
        if urls and len(urls) % dp:
            raise ConfigError(f"rollout.{name} has {len(urls)} server(s), not a multiple of the "
                              f"data-parallel size {dp}: each DP leader drives an equal share of "
                              f"them and is the only one to push weights there; give a multiple "
                              f"of {dp} servers")


def print_config(cfg: JobConfig) -> str:
    return dump(cfg)
