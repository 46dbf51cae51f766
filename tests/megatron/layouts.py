"""Job functions for the layout-equivalence tests (run on spawned gloo ranks).

Each job re-initialises Megatron's parallel state for several layouts in ONE spawned job
(a spawn costs ~5 s) and returns full (TP-gathered, PP-collected) tensors keyed by global
parameter name, so the test compares layouts against the TP=1/PP=1/DP=1 reference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SEED = 1234
HF = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-6)


def _setup(tp=1, pp=1, sp=False, opt=None, hf=HF, cp=1, vpp=None):
    from megatron_ext.model import (ModelConfig, build_transformer_config, load_hf_config,
                                    model_provider)
    from megatron_ext.parallel import ParallelConfig, initialize
    from megatron_ext.train import OptimizerConfig, build_policy

    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, context_parallel=cp,
                              sequence_parallel=sp, virtual_pipeline=vpp), seed=SEED)
    hfc = load_hf_config(hf)
    mc = ModelConfig(hf_config=hfc)
    cfg = build_transformer_config(hfc, mc, tp=tp, pp=pp, cp=cp, vpp=vpp, sequence_parallel=sp)
    model, optimizer = build_policy(model_provider(hfc, cfg, mc), cfg,
                                    opt or OptimizerConfig(lr=1e-2, clip_grad=0.0, adam_eps=1e-3))
    # adam_eps well above gradient rounding noise: Adam divides by sqrt(v), which turns
    # 1e-8-sized fp32 summation-order differences into lr-sized ones where grads are ~0.
    return model, optimizer, cfg


def _global_name(module, name):
    """Rename ``decoder.layers.<local>.`` to the global layer index (PP stages differ)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        layer = module.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
    return ".".join(parts)


def gather_full(model, attr):
    """{global name: full tensor} of ``attr`` ('data' or 'main_grad') over TP and PP."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for chunk in model:
        module = chunk.module
        for name, p in module.named_parameters():
            t = (p.data if attr == "data" else p.main_grad).detach().float().clone()
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                if name.endswith("linear_fc1.weight"):
                    # GLU fc1 shards are [gate_r; up_r]: regroup to [gate; up].
                    halves = [q.chunk(2, dim=0) for q in parts]
                    t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
                else:
                    t = torch.cat(parts, dim=p.partition_dim)
            out[_global_name(module, name)] = t
    # Each PP stage owns different layers: collect all of them (tied embeddings appear on
    # both the first and last stage under different names; both are kept).
    pp_group = ps.get_pipeline_model_parallel_group()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        gathered = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(gathered, out, group=pp_group)
        merged = {}
        for d in gathered:
            merged.update(d)
        out = merged
    return out


def load_full(model, full):
    """Copy full reference tensors (from :func:`gather_full`) into this layout's shards."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    r = ps.get_tensor_model_parallel_rank()
    for chunk in model:
        module = chunk.module
        for name, p in module.named_parameters():
            key = _global_name(module, name)
            if key not in full and key == "output_layer.weight":
                key = "embedding.word_embeddings.weight"  # tied copy on the last PP stage
            t = full[key]
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                if name.endswith("linear_fc1.weight"):
                    gate, up = t.chunk(2, dim=0)
                    t = torch.cat([gate.chunk(tp, dim=0)[r], up.chunk(tp, dim=0)[r]], dim=0)
                else:
                    t = t.chunk(tp, dim=p.partition_dim)[r]
            p.data.copy_(t)


def _lm_step(model, optimizer, tokens, num_microbatches, do_step):
    from megatron.core import parallel_state as ps

    from megatron_ext.train import forward_only, lm_forward_step, reduce_reported, train_step

    dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    total = tokens[:, 1:].numel()
    mine = tokens.chunk(dp, dim=0)[dpr]
    mbs = [{"tokens": t} for t in mine.chunk(num_microbatches, dim=0)]
    fwd = lm_forward_step(num_microbatches, total, vocab_size=HF["vocab_size"])
    seq = tokens.shape[1] - 1
    if do_step:
        res = train_step(model, optimizer, fwd, mbs, seq_length=seq, micro_batch_size=mbs[0]["tokens"].shape[0])
        reported = res.losses
    else:
        for m in model:
            m.zero_grad_buffer()
        from megatron.core.pipeline_parallel import get_forward_backward_func

        it = iter(mbs)
        reported = get_forward_backward_func()(
            forward_step_func=lambda di, m: fwd(next(di), m), data_iterator=it,
            model=model[0], num_microbatches=len(mbs), seq_length=seq,
            micro_batch_size=mbs[0]["tokens"].shape[0], forward_only=False)
    loss = torch.tensor(reduce_reported(reported, "lm_loss", ps.get_data_parallel_group())
                        if ps.is_pipeline_last_stage() else 0.0)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
    return float(loss)


def _logits(model, tokens):
    """Full-vocab logits [b, s, V] of the (PP=1) model, TP shards gathered."""
    inputs = tokens[:, :-1]
    pos = torch.arange(inputs.shape[1]).expand_as(inputs)
    with torch.no_grad():
        out = model[0](inputs, pos, None).float()
    return gather_vocab(out)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [..., V/TP] -> the full vocabulary [..., V] on every TP rank."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _cp_step(model, tokens):
    """Forward/backward of the LM loss on this CP rank's chunks; returns (logits at the full
    positions, NaN elsewhere; gathered grads; loss summed over CP)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    cp, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    s = inputs.shape[1]
    chunk = s // (2 * cp)
    idx = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in (r, 2 * cp - 1 - r)])
    for m in model:
        m.zero_grad_buffer()
    out = model[0](inputs[:, idx], idx.expand(inputs.shape[0], -1), None)
    nll = tensor_parallel.vocab_parallel_cross_entropy(
        out.transpose(0, 1).float().contiguous(), labels[:, idx].transpose(0, 1).contiguous())
    loss = nll.sum() / labels.numel()
    # DDP averages gradients over DP x CP; each CP rank holds part of the loss's numerator.
    (loss * cp).backward()
    model[0].finish_grad_sync()
    full = torch.full((inputs.shape[0], s, out.shape[-1]), float("nan"))
    full[:, idx] = out.detach().float()
    parts = [torch.empty_like(full) for _ in range(cp)]
    dist.all_gather(parts, full, group=ps.get_context_parallel_group())
    logits = torch.stack(parts).nan_to_num(0.0).sum(0)
    total = loss.detach().clone()
    dist.all_reduce(total, group=ps.get_context_parallel_group())
    return logits, gather_full(model, "main_grad"), float(total)


def layouts_job(rank, world_size):
    """TP2 (+/-SP), PP2 and DP2 on 2 ranks, each against the 1-way reference on the same data."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, HF["vocab_size"], (4, 17), generator=g)
    results = {}

    # Reference: TP=1 PP=1 (DP=2 over the data halves: loss and gradients are DP-invariant
    # by the normalisation contract, and the DP check below pins that against DP=1).
    model, opt, _ = _setup()
    results["ref_logits"] = _logits(model, tokens)
    results["ref_loss"] = _lm_step(model, opt, tokens, 1, do_step=False)
    results["ref_grads"] = gather_full(model, "main_grad")
    results["ref_params0"] = gather_full(model, "data")

    ref = results["ref_params0"]
    for label, kw in (("tp2", dict(tp=2)), ("tp2sp", dict(tp=2, sp=True))):
        model, opt, _ = _setup(**kw)
        load_full(model, ref)
        results[f"{label}_logits"] = _logits(model, tokens)
        results[f"{label}_loss"] = _lm_step(model, opt, tokens, 1, do_step=False)
        results[f"{label}_grads"] = gather_full(model, "main_grad")

    model, opt, _ = _setup(pp=2)
    load_full(model, ref)
    results["pp2_loss"] = _lm_step(model, opt, tokens, 2, do_step=False)
    results["pp2_grads"] = gather_full(model, "main_grad")

    # CP=2: each rank holds the load-balanced chunks (r, 3-r) of every sequence; its logits
    # and the summed gradients must equal the full-sequence ones.
    model, opt, _ = _setup(cp=2)
    load_full(model, ref)
    results["cp2_logits"], results["cp2_grads"], results["cp2_loss"] = _cp_step(model, tokens)

    # One optimizer step: DP=2 (2 ranks, TP1) vs the same step with TP=2 (DP=1), both with
    # 1 and 4 micro-batches; the parameters after the step must agree.
    model, opt, _ = _setup()
    load_full(model, ref)
    results["dp2_loss"] = _lm_step(model, opt, tokens, 2, do_step=True)
    results["dp2_params1"] = gather_full(model, "data")
    model, opt, _ = _setup(tp=2)
    load_full(model, ref)
    results["dp1_loss"] = _lm_step(model, opt, tokens, 4, do_step=True)
    results["dp1_params1"] = gather_full(model, "data")
    return results if rank == 0 else None
