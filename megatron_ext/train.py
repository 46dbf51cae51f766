"""Build the distributed policy (model chunks + DDP + optimizer) and run one Megatron step.

``build_policy`` wraps every pipeline-stage chunk in megatron-core's DDP and builds
``get_megatron_optimizer``; ``train_step`` runs ``get_forward_backward_func`` over a list of
micro-batches and steps the optimizer.

Loss normalisation contract. A ``forward_step`` returns, per micro-batch, a loss whose
denominators are already GLOBAL (all micro-batches, all DP ranks; CP ranks each hold part of
the numerator), so the true step loss is the plain sum of those pieces over micro-batches,
DP and CP ranks. megatron-core then multiplies each piece by ``cp / num_microbatches`` (the
schedule's legacy averaging) and DDP scales gradients by ``1 / (dp * cp)`` before summing
them over DP x CP. :func:`schedule_scale` returns ``num_microbatches * dp`` — the factor that
cancels both, so gradients equal those of the single-process loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    lr_decay_steps: int | None = None


def build_model_chunks(provider: Callable, config) -> list[torch.nn.Module]:
    """One model chunk per virtual pipeline stage of this rank (pre/post process set per stage)."""
    from megatron.core import parallel_state as ps

    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(provider(
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage))
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    return chunks


def wrap_ddp(chunks: list[torch.nn.Module], config, opt_cfg: OptimizerConfig) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=opt_cfg.overlap_grad_reduce,
        overlap_param_gather=opt_cfg.overlap_param_gather,
        use_distributed_optimizer=opt_cfg.use_distributed_optimizer,
    )
    return [DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=c,
                                    disable_bucketing=(i > 0))
            for i, c in enumerate(chunks)]


def build_optimizer(model: list, config, opt_cfg: OptimizerConfig):
    from megatron.core.optimizer import OptimizerConfig as MOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    mcfg = MOptimizerConfig(
        optimizer="adam", lr=opt_cfg.lr, min_lr=opt_cfg.min_lr, weight_decay=opt_cfg.weight_decay,
        adam_beta1=opt_cfg.adam_beta1, adam_beta2=opt_cfg.adam_beta2, adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad, bf16=config.bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=opt_cfg.use_distributed_optimizer,
        overlap_param_gather=opt_cfg.overlap_param_gather,
    )
    return get_megatron_optimizer(mcfg, model)


def build_scheduler(optimizer, opt_cfg: OptimizerConfig, total_steps: int):
    """Learning-rate schedule stepped once per optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = opt_cfg.lr_decay_steps or max(total_steps, 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if opt_cfg.lr_warmup_steps else opt_cfg.lr, max_lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr, lr_warmup_steps=opt_cfg.lr_warmup_steps,
        lr_decay_steps=max(decay, opt_cfg.lr_warmup_steps + 1),
        lr_decay_style=opt_cfg.lr_decay_style, start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay, wd_incr_steps=max(decay, 1), wd_incr_style="constant")


def build_policy(provider: Callable, config, opt_cfg: OptimizerConfig):
    """Model chunks wrapped in DDP, the optimizer, and the schedule hooks megatron-core needs."""
    from megatron.core.distributed import finalize_model_grads

    model = wrap_ddp(build_model_chunks(provider, config), config, opt_cfg)
    optimizer = build_optimizer(model, config, opt_cfg)
    config.finalize_model_grads_func = finalize_model_grads
    if opt_cfg.overlap_grad_reduce:
        config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        config.grad_sync_func = ([m.start_grad_sync for m in model] if len(model) > 1
                                 else model[0].start_grad_sync)
    if opt_cfg.overlap_param_gather:
        config.param_sync_func = ([m.start_param_sync for m in model] if len(model) > 1
                                  else model[0].start_param_sync)
    return model, optimizer


def schedule_scale(num_microbatches: int) -> float:
    """Factor a forward_step multiplies its globally-normalised loss by (see module docstring)."""
    from megatron.core import parallel_state as ps

    return float(num_microbatches * ps.get_data_parallel_world_size())


@dataclass
class StepResult:
    losses: list  # what each micro-batch's loss_func reported (last stage only; else empty)
    grad_norm: float | None
    update_successful: bool


def train_step(model: list, optimizer, forward_step: Callable, microbatches: list,
               seq_length: int, micro_batch_size: int = 1, scheduler=None) -> StepResult:
    """One optimizer step over ``microbatches`` (a list consumed in order by ``forward_step``).

    ``forward_step(batch, model) -> (output_tensor, loss_func)`` as megatron-core expects; the
    batch objects are opaque here. ``seq_length`` is the longest sequence dimension any
    micro-batch sends between pipeline stages (variable lengths are exchanged when the config
    has ``variable_seq_lengths``).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()

    def step_fn(data_iterator, chunk):
        return forward_step(next(data_iterator), chunk)

    fb = get_forward_backward_func()
    losses = fb(forward_step_func=step_fn, data_iterator=_chunk_iterators(model, microbatches),
                model=model if len(model) > 1 else model[0],
                num_microbatches=len(microbatches), seq_length=seq_length,
                micro_batch_size=micro_batch_size, forward_only=False)
    if not grads_finite(model):
        # A NaN/Inf loss or gradient on any rank: skip the update everywhere so the weights
        # stay the last good ones (fp32/bf16 megatron optimizers would apply it).
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        return StepResult(losses=list(losses), grad_norm=None, update_successful=False)
    ok, grad_norm, _ = optimizer.step()
    if ok and scheduler is not None:
        scheduler.step(increment=1)
    return StepResult(losses=list(losses), grad_norm=None if grad_norm is None else float(grad_norm),
                      update_successful=bool(ok))


def _chunk_iterators(model: list, microbatches: list):
    """The schedule's data_iterator: one iterator, or under virtual pipelining one per model
    chunk. Every chunk sees every micro-batch (a middle chunk still needs its cu_seqlens and
    row ids), so the chunks must not share one iterator: each would consume the others'."""
    if len(model) == 1:
        return iter(microbatches)
    return [iter(microbatches) for _ in model]


def grads_finite(model: list) -> bool:
    """All main gradients finite on every rank (one all-reduce over the world)."""
    from .parallel import collective_device

    bad = torch.zeros((), dtype=torch.float32, device=collective_device())
    for chunk in model:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None and not bool(torch.isfinite(g).all()):
                bad.fill_(1.0)
                break
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def forward_only(model: list, forward_step: Callable, microbatches: list, seq_length: int,
                 micro_batch_size: int = 1) -> list:
    """Run the schedule without backward; returns what each loss_func reported (last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step_fn(data_iterator, chunk):
        return forward_step(next(data_iterator), chunk)

    iters = _chunk_iterators(model, microbatches)
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=iters,
            model=model if len(model) > 1 else model[0], num_microbatches=len(microbatches),
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True)
    return list(out)


def lm_forward_step(num_microbatches: int, total_tokens: int, vocab_size: int | None = None) -> Callable:
    """Next-token cross-entropy forward_step on fixed-shape batches ``{"tokens": [b, s+1]}``.

    Token-mean over ``total_tokens`` (the whole step's count), scaled per :func:`schedule_scale`.
    ``vocab_size``: the true vocabulary; padded columns get no probability (so the loss does
    not depend on the TP-dependent padding). Used by the layout-equivalence tests.
    """
    from megatron.core import parallel_state as ps

    from .logprobs import vocab_parallel_logprobs_entropy

    scale = schedule_scale(num_microbatches)

    def forward_step(batch, model):
        tokens = batch["tokens"]
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        pos = torch.arange(inputs.shape[1]).expand_as(inputs)
        out = model(inputs, pos, None)

        def loss_func(logits):
            tp = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
            logp, _ = vocab_parallel_logprobs_entropy(logits, labels, tp_group=tp,
                                                      vocab_size=vocab_size)
            loss = -logp.sum() / total_tokens
            return loss * scale, {"lm_loss": loss.detach().clone()}

        return out, loss_func

    return forward_step


def reduce_reported(losses: list, key: str, group=None) -> float:
    """Sum a per-micro-batch reported value over micro-batches and the given group."""
    if not losses:
        total = torch.zeros(())
    else:
        total = torch.stack([d[key].reshape(()) for d in losses]).sum()
    if group is not None and dist.is_initialized():
        from .parallel import collective_device

        total = total.to(collective_device(group))
        dist.all_reduce(total, group=group)
    return float(total)


def iterate_chunks(model) -> Iterable[torch.nn.Module]:
    for chunk in model:
        yield getattr(chunk, "module", chunk)
