"""Job functions for the checkpoint tests (run on spawned gloo ranks; a spawn costs ~5 s, so
each job walks several layouts by re-initialising Megatron's parallel state).

Every job returns plain tensors and dicts (they travel as torch.save bytes) for the test
process to compare against transformers and the saved HF files.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

SEQ = 11


def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 300, (2, SEQ), generator=g)


def _init(tp=1, pp=1, vpp=None):
    from megatron_ext.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp))


def _bare_model(hf_dir, tp=1, pp=1, dtype="fp32"):
    from megatron_ext.model import load_hf_config
    from tools.convert_hf_to_megatron import build_model

    _init(tp, pp)
    hf = load_hf_config(hf_dir)
    return build_model(hf, tp, pp, dtype), hf


def logits(model, toks, microbatches: int = 1) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, Vp] of the model on this layout (TP gathered, through the
    pipeline schedule, the batch cut into ``microbatches``); None on ranks other than the last
    stage."""
    from megatron.core import parallel_state as ps

    from megatron_ext.train import forward_only
    from tests.megatron.layouts import gather_vocab

    def forward_step(batch, chunk):
        pos = torch.arange(batch.shape[1]).expand_as(batch)
        out = chunk(batch, pos, None)
        return out, lambda o: (o.float().sum() * 0, {"logits": o.detach().float()})

    mbs = list(toks.chunk(microbatches, dim=0))
    reported = forward_only(model, forward_step, mbs, seq_length=toks.shape[1],
                            micro_batch_size=mbs[0].shape[0])
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return gather_vocab(torch.cat([r["logits"] for r in reported], dim=0))


def _export(model, hf, bucket_bytes, gather_pipeline=False):
    from megatron_ext.export import export_hf_weights, export_ranks, is_export_rank

    buckets = [[(n, t.clone()) for n, t in b]
               for b in export_hf_weights(model, bucket_bytes=bucket_bytes, hf_config=hf,
                                          gather_pipeline=gather_pipeline)]
    return {"export_rank": is_export_rank(gather_pipeline), "buckets": buckets,
            "export_ranks": export_ranks(gather_pipeline), "bucket_bytes": bucket_bytes}


def _last_stage_value(value):
    """The last PP stage's value on every rank (rank order picks the first non-None)."""
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, value)
    return next(v for v in got if v is not None)


def _policy(hf_dir, tp=1, pp=1, distributed=True, overlap=False):
    from megatron_ext.export import load_hf_weights
    from megatron_ext.hf.files import SafetensorsCheckpoint
    from megatron_ext.model import (ModelConfig, build_transformer_config, load_hf_config,
                                    model_provider)
    from megatron_ext.train import OptimizerConfig, build_policy, build_scheduler

    _init(tp, pp)
    hf = load_hf_config(hf_dir)
    mc = ModelConfig(hf_config=hf)
    cfg = build_transformer_config(hf, mc, tp=tp, pp=pp)
    oc = OptimizerConfig(lr=1e-2, adam_eps=1e-3, clip_grad=1.0, weight_decay=0.1,
                         use_distributed_optimizer=distributed, overlap_grad_reduce=overlap,
                         overlap_param_gather=overlap, lr_warmup_steps=2,
                         lr_decay_style="linear", lr_decay_steps=6)
    model, opt = build_policy(model_provider(hf, cfg, mc), cfg, oc)
    load_hf_weights(model, SafetensorsCheckpoint(hf_dir), hf_config=hf, optimizer=opt)
    return model, opt, build_scheduler(opt, oc, total_steps=6), hf


def _masked_lm_step(num_microbatches, total_tokens):
    """Next-token NLL over the TRUE vocabulary (300 of the padded 384/512 columns), so TP=1 and
    TP=2 train the same function; normalised per megatron_ext.train's contract."""
    from megatron.core import parallel_state as ps

    from megatron_ext.logprobs import vocab_parallel_logprobs_entropy
    from megatron_ext.train import schedule_scale

    scale = schedule_scale(num_microbatches)

    def forward_step(batch, model):
        toks = batch["tokens"]
        inputs, labels = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
        out = model(inputs, torch.arange(inputs.shape[1]).expand_as(inputs), None)

        def loss_func(logits):
            lp, _ = vocab_parallel_logprobs_entropy(
                logits.float().contiguous(), labels, vocab_size=300,
                tp_group=ps.get_tensor_model_parallel_group())
            loss = -lp.sum() / total_tokens
            return loss * scale, {"loss": loss.detach()}

        return out, loss_func

    return forward_step


def _train(model, opt, sched, step):
    from megatron.core import parallel_state as ps

    from megatron_ext.train import train_step

    g = torch.Generator().manual_seed(100 + step)
    toks = torch.randint(0, 300, (4, SEQ + 1), generator=g)
    dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = toks.chunk(dp, dim=0)[dpr]
    mbs = [{"tokens": t} for t in mine.chunk(2, dim=0)]
    train_step(model, opt, _masked_lm_step(len(mbs), toks[:, 1:].numel()), mbs, seq_length=SEQ,
               micro_batch_size=mbs[0]["tokens"].shape[0], scheduler=sched)


def _full_weights(model, hf):
    """Every HF tensor of the model (all stages), on every rank."""
    from megatron_ext.export import export_hf_weights

    return {n: t.clone() for b in export_hf_weights(model, bucket_bytes=1 << 30, hf_config=hf,
                                                     gather_pipeline=True) for n, t in b}


def _adam_state(opt) -> list[dict]:
    """Copies of every inner torch-optimizer state entry, in parameter-group order."""
    from megatron_ext.cpu_compat import _inner_torch_optimizers

    return [{k: v.clone() for k, v in o.state[p].items()}
            for o in _inner_torch_optimizers(opt) for g in o.param_groups for p in g["params"]]


def _shared_steps(opt) -> int:
    """How many parameters share a ``step`` tensor with another parameter."""
    from megatron_ext.cpu_compat import _inner_torch_optimizers

    ids = [id(st["step"]) for o in _inner_torch_optimizers(opt) for st in o.state.values()
           if "step" in st]
    return len(ids) - len(set(ids))


# -- sections --------------------------------------------------------------------------------


def family_section(hf_dir: str, work: str, tag: str) -> dict:
    """Convert with the tools' mains at TP2 and back (TP1, DP2); logits at TP2, TP1 (loaded
    from the TP2 checkpoint) and PP2 (loaded from HF files, saved, reloaded at PP1); export
    at TP2, PP2 and PP2 gathered; the TP2 export stream loaded into the PP2 model."""
    from megatron_ext.checkpoint import load_model_checkpoint, save_model_checkpoint
    from megatron_ext.export import load_hf_weights
    from megatron_ext.hf.files import SafetensorsCheckpoint
    from tools import convert_hf_to_megatron, convert_megatron_to_hf

    toks, r = tokens(), {}
    ckpt_tp2, back = os.path.join(work, f"{tag}-mcore-tp2"), os.path.join(work, f"{tag}-hf-back")
    convert_hf_to_megatron.main(["--hf", hf_dir, "--out", ckpt_tp2, "--tp", "2"])
    convert_megatron_to_hf.main(["--ckpt", ckpt_tp2, "--out", back])
    r["back_dir"] = back

    model, hf = _bare_model(hf_dir, tp=2)
    load_model_checkpoint(ckpt_tp2, model)
    r["tp2_logits"] = logits(model, toks)
    r["tp2_export"] = _export(model, hf, bucket_bytes=40_000)

    model, hf = _bare_model(hf_dir, tp=1)  # DP=2 on two ranks
    load_model_checkpoint(ckpt_tp2, model)
    r["tp1_logits"] = logits(model, toks)
    r["tp1_weights"] = _full_weights(model, hf)

    ckpt_pp2 = os.path.join(work, f"{tag}-mcore-pp2")
    model, hf = _bare_model(hf_dir, pp=2)
    load_hf_weights(model, SafetensorsCheckpoint(hf_dir), hf_config=hf, source=hf_dir)
    r["pp2_logits"] = _last_stage_value(logits(model, toks))
    r["pp2_export"] = _export(model, hf, bucket_bytes=40_000)
    r["pp2_export_gathered"] = _export(model, hf, bucket_bytes=40_000, gather_pipeline=True)
    save_model_checkpoint(ckpt_pp2, model, hf_config=hf)

    model, hf = _bare_model(hf_dir, pp=1)
    load_model_checkpoint(ckpt_pp2, model)
    r["pp1_logits"] = logits(model, toks)

    model, hf = _bare_model(hf_dir, pp=2)
    load_hf_weights(model, iter(r["tp2_export"]["buckets"]), hf_config=hf, source="tp2 export")
    r["pp2_from_stream_logits"] = _last_stage_value(logits(model, toks))
    return r


def vpp_section(hf_dir: str, work: str) -> dict:
    """PP=2 x VPP=2 (one layer per model chunk, ranks hold layers 0+2 and 1+3): loaded from
    HF files, its logits, its gathered export, and its checkpoint loaded back at PP=1."""
    from megatron_ext.checkpoint import load_model_checkpoint, save_model_checkpoint
    from megatron_ext.export import load_hf_weights
    from megatron_ext.hf.files import SafetensorsCheckpoint
    from megatron_ext.model import (ModelConfig, build_transformer_config, load_hf_config,
                                    model_provider)
    from megatron_ext.train import build_model_chunks

    toks, r = tokens(), {}
    _init(pp=2, vpp=2)
    hf = load_hf_config(hf_dir)
    mc = ModelConfig(hf_config=hf, extra={"perform_initialization": False})
    cfg = build_transformer_config(hf, mc, pp=2, vpp=2)
    model = build_model_chunks(model_provider(hf, cfg, mc), cfg)
    load_hf_weights(model, SafetensorsCheckpoint(hf_dir), hf_config=hf, source=hf_dir)
    r["chunks"] = len(model)
    r["logits"] = _last_stage_value(logits(model, toks, microbatches=2))  # a multiple of PP
    r["export_gathered"] = _export(model, hf, bucket_bytes=40_000, gather_pipeline=True)
    ckpt = os.path.join(work, "vpp-mcore")
    save_model_checkpoint(ckpt, model, hf_config=hf)
    model, hf = _bare_model(hf_dir, pp=1)
    load_model_checkpoint(ckpt, model)
    r["pp1_logits"] = logits(model, toks)
    return r


def bf16_section(hf_dir: str, work: str) -> dict:
    """A bf16 HF checkpoint through the mains at TP2 (and back at TP1): dtype kept."""
    from tools import convert_hf_to_megatron, convert_megatron_to_hf

    ckpt, back = os.path.join(work, "bf16-mcore"), os.path.join(work, "bf16-hf-back")
    convert_hf_to_megatron.main(["--hf", hf_dir, "--out", ckpt, "--tp", "2"])
    convert_megatron_to_hf.main(["--ckpt", ckpt, "--out", back, "--max-shard-size", "30KB"])
    return {"back_dir": back}


def resume_section(hf_dir: str, work: str) -> dict:
    """Save at DP=2 after one step; load at DP=2, TP=2 (DP=1) and PP=2 (DP=1) and take the
    next step; compare with the uninterrupted run. Distributed and plain optimizer."""
    from megatron_ext.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from tools import convert_megatron_to_hf

    r = {}
    for distributed in (True, False):
        root = os.path.join(work, f"resume-dist{int(distributed)}")
        model, opt, sched, hf = _policy(hf_dir, distributed=distributed)
        _train(model, opt, sched, 1)
        saved_state = _adam_state(opt)
        step_dir = save_checkpoint(root, 1, model, opt, sched, extra={"data_position": 17, "step": 1},
                                   hf_config=hf, hf_files_dir=hf_dir)
        rng_after_save = torch.rand(4)
        if distributed:  # the trainer's checkpoint converts to HF on its own
            r["step1_weights"] = _full_weights(model, hf)
            r["step1_hf_dir"] = os.path.join(work, "resume-step1-hf")
            convert_megatron_to_hf.main(["--ckpt", step_dir, "--out", r["step1_hf_dir"]])
        _train(model, opt, sched, 2)
        r[(distributed, "uninterrupted")] = _full_weights(model, hf)
        for layout, kw in (("dp2", {}), ("tp2", dict(tp=2)), ("pp2", dict(pp=2))):
            model, opt, sched, hf = _policy(hf_dir, distributed=distributed, **kw)
            extra = load_checkpoint(latest_checkpoint(root), model, opt, sched)
            got = {"extra": extra, "rng": torch.rand(4), "shared_steps": _shared_steps(opt),
                   "scheduler_steps": sched.num_steps, "lr": opt.param_groups[0]["lr"]}
            if layout == "dp2":
                got["adam_state"] = _adam_state(opt)
                got["saved_adam_state"] = saved_state
                got["rng_after_save"] = rng_after_save
            _train(model, opt, sched, 2)
            got["weights"] = _full_weights(model, hf)
            r[(distributed, layout)] = got
    # The distributed optimizer with overlapped parameter all-gather defers the gather of the
    # stepped weights to the next forward: the export must force it.
    model, opt, sched, hf = _policy(hf_dir, distributed=True, overlap=True)
    _train(model, opt, sched, 1)
    _train(model, opt, sched, 2)
    r["overlap_weights"] = _full_weights(model, hf)
    return r


def atomic_section(hf_dir: str, work: str) -> dict:
    """keep_last, an interrupted save, a non-JSON extra and a stale tmp directory."""
    from megatron.core import dist_checkpointing

    from megatron_ext.checkpoint import latest_checkpoint, save_checkpoint

    root = os.path.join(work, "atomic")
    model, opt, sched, hf = _policy(hf_dir)
    r = {}
    for step in (1, 2, 3):
        save_checkpoint(root, step, model, opt, sched, extra={"step": step}, keep_last=2)
    r["after_three"] = sorted(os.listdir(root))

    real_save = dist_checkpointing.save

    def dies_after_writing(*args, **kwargs):
        real_save(*args, **kwargs)
        raise RuntimeError("killed mid-save")

    dist_checkpointing.save = dies_after_writing
    try:
        save_checkpoint(root, 4, model, opt, sched, extra={"step": 4}, keep_last=2)
        r["interrupted"] = "no error"
    except RuntimeError as e:
        r["interrupted"] = str(e)
    finally:
        dist_checkpointing.save = real_save
    dist.barrier()
    r["after_interrupted"] = sorted(os.listdir(root))
    r["latest_after_interrupted"] = latest_checkpoint(root)

    try:
        save_checkpoint(root, 5, model, opt, sched, extra={"bad": object()})
        r["bad_extra"] = "no error"
    except TypeError as e:
        r["bad_extra"] = str(e)
    r["after_bad_extra"] = sorted(os.listdir(root))

    if dist.get_rank() == 0:  # what a save killed by SIGKILL leaves behind
        os.makedirs(os.path.join(root, "tmp-step-6-dead"))
        with open(os.path.join(root, "tmp-step-6-dead", "half.distcp"), "wb") as f:
            f.write(b"\0" * 10)
    dist.barrier()
    r["latest_with_stale_tmp"] = latest_checkpoint(root)
    save_checkpoint(root, 7, model, opt, sched, extra={"step": 7}, keep_last=2)
    r["after_stale_tmp_save"] = sorted(os.listdir(root))
    r["latest_final"] = latest_checkpoint(root)
    return r


def checks_job(rank, world_size, dirs: dict, work: str) -> dict:
    """Every multi-rank check of tests/checkpoints in one spawned job. A failing section
    records its traceback instead of aborting the others."""
    import traceback

    sections = {f"family:{fam}": (family_section, (dirs[fam], work, fam))
                for fam in ("llama", "qwen2", "qwen3")}
    sections["vpp"] = (vpp_section, (dirs["qwen2"], work))  # tied embeddings: the hard case
    sections["bf16"] = (bf16_section, (dirs["llama-bf16"], work))
    sections["resume"] = (resume_section, (dirs["qwen3"], work))
    sections["atomic"] = (atomic_section, (dirs["qwen2"], work))
    out = {"_seconds": {}}
    for name, (fn, args) in sections.items():
        t0 = time.process_time()
        try:
            out[name] = fn(*args)
        except Exception:  # noqa: BLE001 - reported per section by the tests
            out[name] = SectionFailed(traceback.format_exc())
            dist.barrier()
        out["_seconds"][name] = time.process_time() - t0  # CPU s: wall time depends on load
    return out


class SectionFailed(str):
    """The traceback of a section that raised."""
