"""Spawned-rank jobs for the trainer tests: build a Trainer on the tiny example with small
batches and a custom reward that always has variance, then run steps."""

from __future__ import annotations

import torch

TINY = "examples/tiny/grpo.yaml"
SMALL = ["rollout.prompts_per_step=4", "rollout.n_samples=4", "rollout.max_new_tokens=5",
         "trainer.warmup_sft_steps=0", "eval.every_steps=0", "checkpoint.export_hf=false",
         "logging.progress_bar=false", "logging.plot=false",
         "reward.function=tests.pipeline.reward_fns:digit_reward", "reward.num_workers=1",
         "optimizer.lr=1e-2", "trainer.micro_batch_tokens=64"]
PRESET_OVERRIDES = {
    "pods": ["rollout.n_samples=8", "algorithm.downsample={keep: 4}"],
    "jepo": ["algorithm.delimiter='#'"],
    "dapo": ["algorithm.overlong_max_len=5", "algorithm.overlong_cache_len=2"],
}


def _config(run_dir, extra):
    from pipeline.config import load_job_config

    return load_job_config(TINY, SMALL + [f"logging.run_dir={run_dir}"] + list(extra))


def four_layer_model(out: str) -> str:
    """The tiny example's model with 4 layers (randomly initialised) in `out`: PP=2 x VPP=2
    needs a layer count divisible by 4."""
    import json

    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    src = "examples/tiny/build/model"
    with open(f"{src}/config.json") as f:
        fields = json.load(f)
    fields.pop("layer_types", None)  # derived from the layer count
    config = Qwen2Config(**{**fields, "num_hidden_layers": 4})
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _local_params(trainer):
    return [p.detach().clone() for c in trainer.model for p in c.module.parameters()]


def _engine_matches_trainer(trainer) -> bool:
    from megatron_ext.export import export_hf_weights

    exported = {}
    for bucket in export_hf_weights(trainer.model, bucket_bytes=1 << 20, hf_config=trainer.hf,
                                    gather_pipeline=True):
        exported.update(dict(bucket))
    if not trainer.topo.leader:
        return True
    served = trainer.engine.named_weights()
    return set(exported) <= set(served) and all(
        torch.equal(exported[k].float(), served[k].float()) for k in exported)


def presets_job(rank, world_size, tmp, tp, names):
    """One full step of every preset; returns per-preset checks from rank 0."""
    from pipeline.trainer import Trainer

    out = {}
    for name in names:
        extra = [f"algorithm.name={name}", f"parallel.tensor_parallel={tp}",
                 "algorithm.kl_coef=0.01" if name in ("grpo", "pods") else "trainer.seed=1234"]
        trainer = Trainer(_config(f"{tmp}/{name}", extra + PRESET_OVERRIDES.get(name, [])))
        try:
            trainer.sync_weights()
            before = _local_params(trainer)
            metrics = trainer.train_one_step()
            after = _local_params(trainer)
            changed = torch.tensor([max(float((a - b).abs().max()) for a, b in zip(after, before))])
            torch.distributed.all_reduce(changed, op=torch.distributed.ReduceOp.MAX)
            synced = torch.tensor([float(_engine_matches_trainer(trainer))])
            torch.distributed.all_reduce(synced, op=torch.distributed.ReduceOp.MIN)
            out[name] = {"loss": metrics.get("loss"), "changed": float(changed),
                         "synced": bool(synced.item()), "metrics": metrics}
        finally:
            trainer.close()
    return out if rank == 0 else None


def one_step_job(rank, world_size, tmp, layout, names):
    """One step per preset under ``layout`` overrides: metrics and the whole model's weights
    after the step (TP=1, so every rank holds full parameters) from rank 0."""
    from pipeline.trainer import Trainer

    out = {}
    for name in names:
        trainer = Trainer(_config(f"{tmp}/{name}", [f"algorithm.name={name}", *layout,
                                                    *PRESET_OVERRIDES.get(name, [])]))
        try:
            metrics = trainer.train_one_step()
            synced = torch.tensor([float(_engine_matches_trainer(trainer))])
            torch.distributed.all_reduce(synced, op=torch.distributed.ReduceOp.MIN)
            out[name] = {"metrics": metrics, "params": _local_params(trainer),
                         "synced": bool(synced.item())}
        finally:
            trainer.close()
    return out if rank == 0 else None


def resume_job(rank, world_size, tmp):
    """4 steps straight vs 2 steps + resume to 4: final weights and metric rows."""
    from pipeline.metrics import read_metrics
    from pipeline.trainer import Trainer

    def run(run_dir, steps, resume):
        extra = [f"trainer.steps={steps}", "checkpoint.every_steps=2", "algorithm.name=grpo",
                 "algorithm.kl_coef=0.01", f"checkpoint.resume={'true' if resume else 'false'}"]
        t = Trainer(_config(run_dir, extra))
        try:
            t.run()
            return _local_params(t), t.step
        finally:
            t.close()

    straight, _ = run(f"{tmp}/straight", 4, False)
    run(f"{tmp}/split", 2, False)
    resumed, step = run(f"{tmp}/split", 4, True)
    diff = max(float((a - b).abs().max()) for a, b in zip(straight, resumed))
    if rank != 0:
        return None
    keys = ("reward_mean", "pass_rate", "loss", "grad_norm", "entropy", "response_length")
    rows = lambda d: [{k: r.get(k) for k in keys} | {"step": r["step"]}  # noqa: E731
                      for r in read_metrics(f"{d}/metrics.jsonl")]
    return {"weight_diff": diff, "step": step, "straight": rows(f"{tmp}/straight"),
            "split": rows(f"{tmp}/split")}


class _NanLoss:
    """Delegates to an Algorithm but poisons the loss: a NaN step must be skipped."""

    def __init__(self, algo):
        self._algo = algo

    def __getattr__(self, name):
        return getattr(self._algo, name)

    def loss(self, *args, **kwargs):
        loss, metrics = self._algo.loss(*args, **kwargs)
        return loss * float("nan"), metrics


def faults_job(rank, world_size, tmp):
    """A NaN loss is skipped with weights untouched; a raising reward scores 0 and is counted."""
    from pipeline.trainer import Trainer

    t = Trainer(_config(f"{tmp}/faults", ["reward.function=tests.pipeline.reward_fns:flaky_reward",
                                          "rollout.n_samples=8"]))
    try:
        t.sync_weights()
        t.algo = _NanLoss(t.algo)
        before = _local_params(t)
        m1 = t.train_one_step()
        untouched = all(torch.equal(a, b) for a, b in zip(before, _local_params(t)))
        t.algo = t.algo._algo
        m2 = t.train_one_step()
        moved = any(not torch.equal(a, b) for a, b in zip(before, _local_params(t)))
    finally:
        t.close()
    return {"nan_skipped": m1["nan_steps_skipped"], "untouched": untouched, "moved": moved,
            "reward_errors": m1["reward_errors"] + m2["reward_errors"],
            "finite_after": m2["loss"] == m2["loss"]} if rank == 0 else None


def sglang_standin_job(rank, world_size, tmp):
    """One step with rollout.engine=sglang on CPU: two `groupwise serve` stand-in workers
    behind the real sglang-router, weights pushed over HTTP, then checked on both workers."""
    import json
    import urllib.request

    from pipeline.trainer import Trainer

    t = Trainer(_config(f"{tmp}/sglang", [
        "rollout.engine=sglang",
        "rollout.sglang={kind: stand-in, num_servers: 2, health_timeout_s: 120, "
        f"log_dir: {tmp}/server-logs}}"]))
    try:
        t.sync_weights()
        m = t.train_one_step()
        versions = []
        for w in t.engine.workers:
            with urllib.request.urlopen(w.url + "/get_weight_version", timeout=30) as r:
                versions.append(json.load(r).get("weight_version"))
        return {"loss": m.get("loss"), "trainer_version": t.weight_version, "versions": versions,
                "responses": m["response_length"]}
    finally:
        t.close()


def overlap_job(rank, world_size, tmp):
    """Weight versions the rollouts were sampled with, per step, with and without the
    one-step-off-policy overlap."""
    from pipeline.trainer import Trainer

    out = {}
    for overlap in (False, True):
        t = Trainer(_config(f"{tmp}/overlap-{overlap}", [
            f"rollout.off_policy_overlap={'true' if overlap else 'false'}", "trainer.steps=3",
            "algorithm.tis=truncate"]))
        try:
            t.sync_weights()
            versions, losses = [], []
            for _ in range(3):
                m = t.train_one_step()
                t.step += 1
                versions.append(t.rollout_weight_versions)
                losses.append(m["loss"])
            out[overlap] = {"versions": versions, "losses": losses}
        finally:
            t.close()
    return out
