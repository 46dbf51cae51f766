"""The RL loop (architecture spec, "One RL step"), SPMD: every rank runs :meth:`Trainer.run`.

    build -> [warm-up] -> for step: rollout (leader) -> broadcast -> old/ref log-probs ->
    advantages -> mini-batch updates -> weight sync -> metrics -> checkpoint
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ext.packing import Row
from megatron_ext.parallel import collective_device, replica_group
from megatron_ext.policy_step import ReferenceWeights, compute_logprobs, policy_update
from pipeline.config import JobConfig, algorithm_of
from pipeline.config_io import to_dict
from pipeline.dp_balance import balance_over_dp
from pipeline.metrics import MetricsLogger, ratio, reduce_sums
from pipeline.rollout import Group, rollout_step

log = logging.getLogger("groupwise")


@dataclass
class Topology:
    dp: int
    dp_rank: int
    dp_group: object
    mp_group: object  # ranks holding one replica (TP x CP x PP); share one engine
    leader: bool  # owns the engine client and the reward pool of its replica
    leader_global: int
    last_stage: bool


def _topology() -> Topology:
    from megatron.core import parallel_state as ps

    mp = replica_group()
    leader_global = dist.get_global_rank(mp, 0)
    return Topology(dp=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
                    dp_group=ps.get_data_parallel_group(), mp_group=mp,
                    leader=dist.get_rank() == leader_global, leader_global=leader_global,
                    last_stage=ps.is_pipeline_last_stage())


def _broadcast(obj, topo: Topology):
    if dist.get_world_size(topo.mp_group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=topo.leader_global, group=topo.mp_group)
    return box[0]


class Trainer:
    def __init__(self, cfg: JobConfig):
        from transformers import AutoTokenizer

        from megatron_ext.model import build_transformer_config, load_hf_config, model_provider
        from megatron_ext.parallel import initialize
        from megatron_ext.train import build_policy, build_scheduler
        from pipeline.data import PromptDataset, PromptLoader

        self.cfg = cfg
        initialize(cfg.parallel, seed=cfg.trainer.seed)
        self.topo = _topology()
        self.hf_path = cfg.model.hf_config
        self.hf = load_hf_config(self.hf_path)
        self.tcfg = build_transformer_config(
            self.hf, cfg.model, tp=cfg.parallel.tensor_parallel, pp=cfg.parallel.pipeline_parallel,
            cp=cfg.parallel.context_parallel, vpp=cfg.parallel.virtual_pipeline,
            sequence_parallel=cfg.parallel.sequence_parallel)
        self.model, self.optimizer = build_policy(model_provider(self.hf, self.tcfg, cfg.model),
                                                  self.tcfg, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer,
                                         cfg.trainer.steps * cfg.trainer.updates_per_step)
        _load_initial_weights(self.model, self.optimizer, self.hf_path, self.hf)
        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_path)
        self.algo = algorithm_of(cfg)
        self.dataset = PromptDataset(cfg.data, self.tokenizer)
        self.loader = PromptLoader(self.dataset, cfg.rollout.prompts_per_step)
        self.vocab = self.hf.vocab_size
        self.step = 0
        self.weight_version = 0
        self.counters = {"nan_steps_skipped": 0, "reward_timeouts": 0, "reward_errors": 0}
        self.engine = self.ref_engine = self.scorer = None
        if self.topo.leader:
            from pipeline.engines import build_engine
            from pipeline.rewards import RewardScorer

            share = dict(dp_rank=self.topo.dp_rank, dp=self.topo.dp)
            self.engine = build_engine(cfg, self.hf_path, **share)
            if self.algo.name == "aapo":
                # AAPO's reference rollouts come from the frozen initial policy: a second
                # engine that never receives weight updates.
                self.ref_engine = build_engine(cfg, self.hf_path, **share, reference=True)
            self.scorer = RewardScorer(cfg.reward)
        needs_ref = getattr(self.algo.config, "kl_coef", 0) > 0 or self.algo.name == "spro"
        self.ref_weights = ReferenceWeights(self.model) if needs_ref else None
        run_dir = cfg.logging.run_dir
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")
        self.metrics = MetricsLogger(run_dir, enabled=dist.get_rank() == 0,
                                     tensorboard=cfg.logging.tensorboard,
                                     wandb_project=cfg.logging.wandb_project,
                                     config=to_dict(cfg), resume=cfg.checkpoint.resume)
        self._stop_requested = False
        self._prefetch = None
        self._pool = None
        if cfg.rollout.off_policy_overlap and self.topo.leader:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if cfg.checkpoint.resume:
            self._maybe_resume()

    # ------------------------------------------------------------------ control

    def _on_sigterm(self, signum, frame):
        # Slurm preemption: finish the step in flight, checkpoint, exit; the requeued job
        # resumes from that checkpoint.
        self._stop_requested = True

    def _stop_everywhere(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def run(self) -> dict:
        cfg = self.cfg
        if self.step == 0 and cfg.trainer.warmup_sft_steps > 0:
            self.warmup()
        self.sync_weights()
        if cfg.eval.every_steps and self.step == 0:
            self.evaluate(0)
        last = {}
        bar = _Progress(cfg.trainer.steps, self.step, enabled=dist.get_rank() == 0 and cfg.logging.progress_bar)
        while self.step < cfg.trainer.steps:
            last = self.train_one_step()
            self.step += 1
            bar.update(self.step, last)
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                self.evaluate(self.step)
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
            if self._stop_everywhere():
                self.save()
                log.warning("SIGTERM: checkpoint at step %d written; stopping", self.step)
                bar.close()
                return {"stopped_at": self.step, **last}
        bar.close()
        if not cfg.checkpoint.every_steps or self.step % cfg.checkpoint.every_steps:
            self.save()
        if cfg.checkpoint.export_hf:
            self.export_hf(os.path.join(cfg.logging.run_dir, "hf"))
        return last

    def close(self):
        self._wait_prefetch()
        if self._pool is not None:
            self._pool.shutdown()
        for e in (self.engine, self.ref_engine, self.scorer):
            if e is not None:
                e.close()
        self.metrics.close()

    # ------------------------------------------------------------------ one step

    def _leader_rollout(self, step: int):
        """Generate and reward this replica's groups for ``step`` (leader only; may run in the
        prefetch thread). Returns the payload broadcast to the replica's other ranks."""
        from pipeline.data import shard_batch

        draws = [0]

        def next_records():
            draws[0] += 1
            return shard_batch(next(self.loader), self.topo.dp_rank, self.topo.dp)

        cfg = self.cfg
        seed = cfg.rollout.seed * 1_000_003 + step * 1009 + self.topo.dp_rank
        result = rollout_step(engine=self.engine, tokenizer=self.tokenizer, scorer=self.scorer,
                              next_records=next_records, algo=self.algo, rollout_cfg=cfg.rollout,
                              seed=seed, ref_engine=self.ref_engine)
        return (result.groups, result.metrics, result.reward_counters, draws[0])

    def _wait_prefetch(self):
        """Block until the background rollout (if any) is done with the engine."""
        if self._prefetch is not None:
            self._prefetch.exception()  # waits; the result is collected by the next step

    def train_one_step(self) -> dict:
        cfg, topo = self.cfg, self.topo
        t0 = time.perf_counter()
        payload = None
        if topo.leader:
            if self._prefetch is not None:
                payload, self._prefetch = self._prefetch.result(), None
            else:
                payload = self._leader_rollout(self.step)
        groups, roll_metrics, reward_counters, draws = _broadcast(payload, topo)
        self.rollout_weight_versions = sorted({v for g in groups for v in g.weight_versions})
        # Every rank consumes the loader identically: non-leaders and leaders that drew fewer
        # batches (DAPO refills) skip ahead to the furthest draw of any rank.
        draws_max = torch.tensor([float(draws)], device=collective_device())
        dist.all_reduce(draws_max, op=dist.ReduceOp.MAX)
        for _ in range(int(draws_max.item()) - (draws if topo.leader else 0)):
            next(self.loader)
        if cfg.rollout.off_policy_overlap and topo.leader and self.step + 1 < cfg.trainer.steps:
            # One-step off-policy: step t+1's rollout runs on the weights of step t-1 while
            # step t trains; sync_weights waits for it. TIS corrects the mismatch.
            self._prefetch = self._pool.submit(self._leader_rollout, self.step + 1)
        t_rollout = time.perf_counter() - t0

        t1 = time.perf_counter()
        groups, balance = balance_over_dp(groups, topo.dp_group, cfg.trainer.updates_per_step)
        rows, step_batch, entropy_sum = self._prepare(groups)
        terms = self.algo.advantages(step_batch, group=topo.dp_group)
        t_prep = time.perf_counter() - t1

        t2 = time.perf_counter()
        # Colocated SGLang gives its weights and KV cache back while the trainer steps (the
        # planner counts on it); not with overlap, where it is generating meanwhile.
        release = (topo.leader and cfg.rollout.engine == "sglang"
                   and cfg.rollout.sglang.get("layout", "colocated") == "colocated"
                   and not cfg.rollout.off_policy_overlap)
        if release:
            self.engine.release_memory()
        try:
            loss_metrics, grad_norms, skipped = self._update(rows, terms, len(groups))
        finally:
            if release:
                self.engine.resume_memory()
        t_train = time.perf_counter() - t2

        t3 = time.perf_counter()
        self.sync_weights()
        t_sync = time.perf_counter() - t3

        sums = dict(roll_metrics)
        sums["entropy_sum"] = entropy_sum
        sums["tokens"] = float(sum(r.n_scored for r in rows))
        for k in ("timeouts", "errors", "no_answer", "format_failures"):
            sums[f"reward_{k}"] = float(reward_counters.get(k, 0))
        # Rollout sums are per replica (already equal across its TP/PP ranks): reduce over DP.
        sums = reduce_sums(sums, topo.dp_group)
        # Loss metrics are shares on the last stage: sum over DP there, then over PP.
        loss_sums = reduce_sums(loss_metrics, topo.dp_group)
        loss_sums = _from_last_stage(loss_sums, topo)
        out = {
            "reward_mean": ratio(sums["reward_sum_full"], sums["responses_full"]),
            "pass_rate": ratio(sums["correct_sum_full"], sums["responses_full"]),
            "reward_mean_kept": ratio(sums["reward_sum_kept"], sums["responses_kept"]),
            "pass_rate_kept": ratio(sums["correct_sum_kept"], sums["responses_kept"]),
            "response_length": ratio(sums["length_sum_full"], sums["responses_full"]),
            "entropy": ratio(sums["entropy_sum"], sums["tokens"]),
            "grad_norm": grad_norms[-1] if grad_norms else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens_per_s": sums["tokens"] / max(t_train, 1e-9),
            "time_rollout": t_rollout, "time_prepare": t_prep, "time_train": t_train,
            "time_sync": t_sync, "weight_version": self.weight_version,
            "nan_steps_skipped": self.counters["nan_steps_skipped"],
            "reward_timeouts": sums["reward_timeouts"], "reward_errors": sums["reward_errors"],
            **balance,
        }
        for k, v in loss_sums.items():
            out[k] = v / max(cfg.trainer.updates_per_step, 1)
        for k in ("dynamic_sampling_rounds", "dynamic_sampling_short"):
            if k in sums:
                out[k] = sums[k] / topo.dp
        self.metrics.log(self.step + 1, out)
        return out

    def _prepare(self, groups: list[Group]):
        """Rows for Megatron and the StepBatch of this rank (old/ref log-probs included)."""
        from pipeline.algorithms import StepBatch

        jepo = self.algo.name == "jepo"
        if jepo:
            rows, mask, extra = self._jepo_rows(groups)
        else:
            rows = [Row(tokens=g.prompt_ids + resp, loss_start=len(g.prompt_ids))
                    for g in groups for resp in g.responses]
            extra = {}
        budget = self.cfg.trainer.micro_batch_tokens
        chunk = self.cfg.trainer.logprob_chunk_tokens
        temp = self.cfg.rollout.temperature
        old, ent = compute_logprobs(self.model, rows, token_budget=budget, temperature=temp,
                                    vocab_size=self.vocab, chunk_size=chunk, with_entropy=True)
        ref = None
        if self.ref_weights is not None:
            with self.ref_weights.active(self.model):
                ref = compute_logprobs(self.model, rows, token_budget=budget, temperature=temp,
                                       vocab_size=self.vocab, chunk_size=chunk)
        width = max(r.n_scored for r in rows)
        if not jepo:
            mask = torch.zeros(len(rows), width)
            for i, r in enumerate(rows):
                mask[i, :r.n_scored] = 1.0
        rollout_lp = [lp for g in groups for lp in g.rollout_logprobs]
        kw = dict(
            rewards=torch.tensor([g.rewards for g in groups], dtype=torch.float32),
            mask=mask, old_logprobs=_pad(old, width), rollout_logprobs=_pad(rollout_lp, width),
            correct=torch.tensor([g.correct for g in groups]).float(), **extra)
        if ref is not None:
            kw["ref_logprobs"] = _pad(ref, width)
        if groups[0].answer_ids is not None:
            kw["answer_ids"] = torch.tensor([g.answer_ids for g in groups])
        if groups[0].ref_rewards is not None:
            kw["ref_rewards"] = torch.tensor([g.ref_rewards for g in groups], dtype=torch.float32)
        entropy_sum = float(sum(e.sum() for e in ent))
        return rows, StepBatch(**kw), entropy_sum

    def _jepo_rows(self, groups: list[Group]):
        """JEPO trains on ``prompt + c_i + a*``: the sample cut after the delimiter, then the
        reference answer's tokens (spec section 5); the answer tokens get their own mask."""
        from pipeline.algorithms import build_jepo_sequence, pad_jepo_sequences

        cfg = self.algo.config
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        seqs, rows = [], []
        for g in groups:
            answer = self.tokenizer(g.answer or "", add_special_tokens=False)["input_ids"]
            for resp in g.responses:
                seq = build_jepo_sequence(resp, answer, decode, delimiter=cfg.delimiter,
                                          eos_id=self.tokenizer.eos_token_id if cfg.answer_eos else None)
                seqs.append(seq)
                rows.append(Row(tokens=g.prompt_ids + seq.tokens.tolist(), loss_start=len(g.prompt_ids)))
        _, cot, answer_mask, valid, formatted = pad_jepo_sequences(seqs)
        shape = (len(groups), len(groups[0].responses))
        return rows, cot.float(), {"answer_mask": answer_mask.float(),
                                   "valid": valid.view(shape), "formatted": formatted.view(shape)}

    def _update(self, rows: list[Row], terms, n_groups: int):
        cfg, topo = self.cfg, self.topo
        U = cfg.trainer.updates_per_step
        G = len(rows) // max(n_groups, 1)
        per = n_groups // U
        metrics: dict[str, float] = {}
        grad_norms = []
        skipped = 0
        for u in range(U):
            idx = torch.arange(u * per * G, (u + 1) * per * G)
            t_u = terms.rows(idx)
            denom = self.algo.denominators(t_u, group=topo.dp_group)
            mb_rows = [rows[i] for i in idx.tolist()]

            def loss_fn(row_ids, lp, ent, mask, t_u=t_u, denom=denom):
                sel = t_u.rows(torch.tensor(row_ids, dtype=torch.long), width=lp.shape[1]).to(lp.device)
                return self.algo.loss(lp, sel, denom, entropy=ent)

            res, m = policy_update(self.model, self.optimizer, mb_rows, loss_fn,
                                   token_budget=cfg.trainer.micro_batch_tokens,
                                   temperature=cfg.rollout.temperature, vocab_size=self.vocab,
                                   chunk_size=cfg.trainer.logprob_chunk_tokens,
                                   scheduler=self.scheduler)
            if not res.update_successful:
                skipped += 1
                self.counters["nan_steps_skipped"] += 1
            elif res.grad_norm is not None:
                grad_norms.append(res.grad_norm)
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + float(v)
        return metrics, grad_norms, skipped

    # ------------------------------------------------------------------ weights

    def sync_weights(self):
        """Push the trainer's weights to this replica's engine (pause/flush/update/resume is
        the engine's job); every completion afterwards records the new version."""
        from megatron_ext.export import export_hf_weights

        self.weight_version += 1
        # The leader (PP rank 0) serves the whole model: with PP > 1 every stage's buckets are
        # broadcast over the pipeline group.
        buckets = export_hf_weights(self.model, bucket_bytes=self.cfg.rollout.weight_bucket_mb << 20,
                                    hf_config=self.hf,
                                    gather_pipeline=self.cfg.parallel.pipeline_parallel > 1)
        if self.topo.leader:
            self.engine.update_weights(buckets, version=self.weight_version)
        else:
            for _ in buckets:  # the export is collective: non-leaders take part
                pass
        r = self.cfg.rollout
        if r.engine == "http" and r.router_url and self.topo.dp > 1:
            # Each DP leader updated only its share of the servers, but the router sends any
            # leader's requests to any server: nobody generates until every share is updated.
            dist.barrier(group=self.topo.dp_group)

    def export_hf(self, out_dir: str):
        """Write the policy as a Hugging Face checkpoint (config and tokenizer files copied)."""
        from megatron_ext.export import write_hf_checkpoint

        write_hf_checkpoint(self.model, out_dir, hf_config=self.hf, files_dir=self.hf_path,
                            force=True)
        if dist.get_rank() == 0:
            print(f"Hugging Face checkpoint: {out_dir}", flush=True)

    # ------------------------------------------------------------------ warm-up / eval

    def warmup(self):
        from pipeline.warmup import sft_rows, sft_step

        cfg = self.cfg
        saved_lr = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = cfg.trainer.warmup_sft_lr
        gen = torch.Generator().manual_seed(cfg.trainer.seed)
        n = len(self.dataset)
        for i in range(cfg.trainer.warmup_sft_steps):
            if self._stop_everywhere():
                # No checkpoint: the warm-up is short and a resumed run (step 0) redoes it.
                raise SystemExit("SIGTERM during the supervised warm-up: stopping without a checkpoint")
            pick = torch.randint(0, n, (cfg.trainer.warmup_sft_batch,), generator=gen).tolist()
            recs = [self.dataset.get(j) for j in pick]
            recs = [r for r in recs if hasattr(r, "prompt_ids")]
            mine = recs[self.topo.dp_rank::self.topo.dp]
            nll = sft_step(self.model, self.optimizer, sft_rows(mine, self.tokenizer, cfg.trainer.warmup_answer_format),
                           token_budget=cfg.trainer.micro_batch_tokens, dp_group=self.topo.dp_group,
                           vocab_size=self.vocab)
            if dist.get_rank() == 0 and (i % 20 == 0 or i == cfg.trainer.warmup_sft_steps - 1):
                print(f"warm-up step {i + 1}/{cfg.trainer.warmup_sft_steps}: answer NLL {nll:.4f}",
                      flush=True)
        for g, lr in zip(self.optimizer.param_groups, saved_lr):
            g["lr"] = lr
        if self.ref_weights is not None:
            # The KL/SPRO reference is the policy RL starts from: the warmed-up one.
            self.ref_weights = ReferenceWeights(self.model)

    def evaluate(self, step: int) -> dict:
        from pipeline.evaluate import evaluate_replica

        ev = self.cfg.eval
        if ev.data is None:
            return {}
        if self.topo.leader:
            sums = evaluate_replica(self.engine, self.tokenizer, self.scorer, self.cfg,
                                    dp_rank=self.topo.dp_rank, dp=self.topo.dp, seed=step)
        else:
            sums = None
        sums = _broadcast(sums, self.topo)
        sums = reduce_sums(sums, self.topo.dp_group)
        out = {f"eval_{k}": ratio(sums[k], sums["prompts"]) for k in sums if k != "prompts"}
        self.metrics.log(step, out)
        if dist.get_rank() == 0:
            print("eval " + " ".join(f"{k}={v:.3f}" for k, v in out.items()), flush=True)
        return out

    # ------------------------------------------------------------------ checkpoints

    def _extra_state(self) -> dict:
        return {"step": self.step, "loader": self.loader.state_dict(),
                "weight_version": self.weight_version, "counters": dict(self.counters)}

    def save(self):
        from megatron_ext.checkpoint import save_checkpoint

        save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler,
                        extra=self._extra_state(), keep_last=self.cfg.checkpoint.keep_last,
                        hf_config=self.hf, hf_files_dir=self.hf_path)

    def _maybe_resume(self):
        from megatron_ext.checkpoint import latest_checkpoint, load_checkpoint

        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return
        extra = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.step = int(extra["step"])
        self.loader.load_state_dict(extra["loader"])
        self.weight_version = int(extra["weight_version"])
        self.counters.update(extra.get("counters", {}))
        self.metrics.truncate_after(self.step)
        if dist.get_rank() == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)


def _pad(seqs, width: int) -> torch.Tensor:
    out = torch.zeros(len(seqs), width)
    for i, s in enumerate(seqs):
        s = torch.as_tensor(s, dtype=torch.float32)[:width]
        out[i, :len(s)] = s
    return out


def _from_last_stage(values: dict[str, float], topo: Topology) -> dict[str, float]:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return values
    box = [values if topo.last_stage else None]
    src = dist.get_global_rank(ps.get_pipeline_model_parallel_group(),
                               ps.get_pipeline_model_parallel_world_size() - 1)
    dist.broadcast_object_list(box, src=src, group=ps.get_pipeline_model_parallel_group())
    return box[0]


def _load_initial_weights(model, optimizer, hf_path, hf):
    from megatron_ext.export import load_hf_weights
    from megatron_ext.hf.files import SafetensorsCheckpoint

    load_hf_weights(model, SafetensorsCheckpoint(hf_path), hf_config=hf, optimizer=optimizer,
                    source=hf_path)


class _Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="rl steps", dynamic_ncols=True)

    def update(self, step: int, m: dict):
        if self.bar is None:
            return
        self.bar.n = step
        self.bar.set_postfix(reward=f"{m.get('reward_mean', 0):.3f}",
                             pass_rate=f"{m.get('pass_rate', 0):.3f}",
                             len=f"{m.get('response_length', 0):.1f}")
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
