"""The RL loss path through megatron-core: packed micro-batches -> vocab-parallel log-probs and
entropy on the last pipeline stage -> the algorithm's loss, with the normalisation contract of
:mod:`megatron_ext.train`.

The algorithm's loss comes in as a callable so ``megatron_ext`` never imports ``pipeline``::

    loss_fn(row_ids: list[int], logprobs [rows, T], entropy [rows, T], mask [rows, T])
        -> (loss: scalar tensor, metrics: dict[str, scalar tensor])

``loss`` must already use the step-global denominators (all micro-batches, all DP ranks), i.e.
the true mini-batch loss is the SUM of the returned losses over micro-batches and DP ranks;
the same holds for every metric, which the trainer sums over DP (not over CP: under context
parallelism every CP rank sees the whole rows, see :class:`_CompleteRowsOverCP`).

``token_budget`` counts the tokens of one packed micro-batch before it is split over CP ranks
(each CP rank holds ``token_budget / CP`` of them).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .logprobs import vocab_parallel_logprobs_entropy
from .model import fp8_alignment
from .packing import PackedMicroBatch, Row, pack_all, pad_multiples, split_for_context_parallel
from .train import forward_only, schedule_scale, train_step

LossFn = Callable[[list, torch.Tensor, torch.Tensor, torch.Tensor], tuple]


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def _cp_group():
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None


class _CompleteRowsOverCP(torch.autograd.Function):
    """[..., rows, T] partial rows per CP rank (zeros at tokens another rank holds) -> the
    complete rows on every CP rank.

    Forward all-reduces (sums): each scored token is held by exactly one rank. Backward is the
    identity, not an all-reduce: every CP rank evaluates the same loss on the same complete
    rows, so each rank's incoming gradient already is the whole gradient, and the slice that
    reaches its own tokens (the other positions were masked to zero) is exactly once.
    Per-sequence terms (sequence means, GSPO's sequence ratio, JEPO answer sums, SPRO prefix
    sums) are then computed on whole sequences by the unchanged algorithm code.
    """

    @staticmethod
    def forward(ctx, partial, group):
        full = partial.clone()
        dist.all_reduce(full, group=group)
        return full

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _model_forward(model, mb: PackedMicroBatch):
    return model(mb.input_ids[None], mb.position_ids[None], None,
                 packed_seq_params=mb.packed_seq_params())


def _row_logprobs(logits, mb: PackedMicroBatch, *, temperature, vocab_size, chunk_size):
    """logits [1, t_local, V/TP] -> (logprobs, entropy) [rows, T] left-aligned and complete
    (all CP ranks' tokens), mask [rows, T]."""
    logp, ent = vocab_parallel_logprobs_entropy(
        logits[0], mb.targets, tp_group=_tp_group(), temperature=temperature,
        chunk_size=chunk_size, vocab_size=vocab_size)
    lp_rows, ent_rows = mb.to_rows(logp), mb.to_rows(ent)
    cp_group = _cp_group()
    if cp_group is not None:
        lp_rows, ent_rows = _CompleteRowsOverCP.apply(torch.stack([lp_rows, ent_rows]),
                                                      cp_group).unbind(0)
    return lp_rows, ent_rows, mb.score_mask


def microbatches(rows: list[Row], token_budget: int, config) -> list[PackedMicroBatch]:
    """This rank's packed micro-batches: padded for sequence parallelism, CP and FP8, under PP
    to one length (and under virtual pipelining to a count that is a multiple of PP), and
    under CP cut down to this CP rank's share."""
    from megatron.core import parallel_state as ps

    cp = config.context_parallel_size
    recipe = getattr(config, "fp8_recipe", None)
    fp8 = fp8_alignment(getattr(recipe, "value", recipe)) if config.fp8 else 1
    seq_multiple, multiple = pad_multiples(tp=config.tensor_model_parallel_size,
                                           sequence_parallel=config.sequence_parallel, cp=cp,
                                           fp8_multiple=fp8)
    pp = config.pipeline_model_parallel_size
    interleaved = (config.virtual_pipeline_model_parallel_size or 1) > 1
    packs = pack_all(rows, token_budget, pad_to_multiple=multiple, seq_multiple=seq_multiple,
                     same_length=pp > 1, count_multiple=pp if interleaved else 1)
    if cp > 1:
        rank = ps.get_context_parallel_rank()
        packs = [split_for_context_parallel(mb, cp, rank) for mb in packs]
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        packs = [mb.to(device) for mb in packs]
    return packs


def _p2p_seq_length(mbs: list[PackedMicroBatch], config) -> int:
    """The sequence length megatron-core's schedule sizes pipeline p2p buffers from: the whole
    pack's, since the schedule itself divides by CP (and by TP under sequence parallelism)."""
    return max(mb.num_tokens for mb in mbs) * config.context_parallel_size


def policy_update(model, optimizer, rows: list[Row], loss_fn: LossFn, *, token_budget: int,
                  temperature: float = 1.0, vocab_size: int | None = None,
                  chunk_size: int | None = None, scheduler=None):
    """One optimizer step on ``rows`` (this DP rank's share of a mini-batch).

    Returns (StepResult, summed metrics on the last PP stage or {}).
    """
    config = _config(model)
    mbs = microbatches(rows, token_budget, config)
    scale = schedule_scale(len(mbs))

    def forward_step(mb, chunk):
        out = _model_forward(chunk, mb)

        def loss_func(logits):
            if not mb.row_ids:
                # A padding-only pack (see pack_all's count_multiple): nothing to score, but
                # the backward must still run through the stage so the pipeline's gradient
                # exchange stays in step; the same on every TP/CP rank, which hold the same packs.
                return logits.sum() * 0.0, {}
            lp, ent, mask = _row_logprobs(logits, mb, temperature=temperature,
                                          vocab_size=vocab_size, chunk_size=chunk_size)
            loss, metrics = loss_fn(mb.row_ids, lp, ent, mask)
            return loss * scale, {k: v.detach().reshape(()) for k, v in metrics.items()}

        return out, loss_func

    res = train_step(model, optimizer, forward_step, mbs, seq_length=_p2p_seq_length(mbs, config),
                     scheduler=scheduler)
    summed: dict[str, torch.Tensor] = {}
    for d in res.losses:
        for k, v in d.items():
            summed[k] = summed.get(k, 0.0) + v
    return res, summed


def compute_logprobs(model, rows: list[Row], *, token_budget: int, temperature: float = 1.0,
                     vocab_size: int | None = None, chunk_size: int | None = None,
                     with_entropy: bool = False) -> list[torch.Tensor] | tuple:
    """No-grad per-row log-probs of the scored tokens: list of [n_scored] fp32, on every rank
    (computed on the last PP stage and broadcast over the pipeline group)."""
    from megatron.core import parallel_state as ps

    config = _config(model)
    mbs = microbatches(rows, token_budget, config)

    def forward_step(mb, chunk):
        out = _model_forward(chunk, mb)

        def loss_func(logits):
            if not mb.row_ids:  # a padding-only pack
                return torch.zeros(()), {"row_ids": []}
            lp, ent, mask = _row_logprobs(logits, mb, temperature=temperature,
                                          vocab_size=vocab_size, chunk_size=chunk_size)
            return torch.zeros(()), {"row_ids": mb.row_ids, "logprobs": lp, "entropy": ent,
                                     "mask": mask}

        return out, loss_func

    for chunk in model:
        chunk.eval()
    try:
        reported = forward_only(model, forward_step, mbs, seq_length=_p2p_seq_length(mbs, config))
    finally:
        for chunk in model:
            chunk.train()
    per_row: list = [None] * len(rows)
    ents: list = [None] * len(rows)
    for d in reported:
        for k, r in enumerate(d["row_ids"]):
            n = int(d["mask"][k].sum())
            # Host copies: the trainer's step bookkeeping (advantages, ratios' old values)
            # lives on the CPU until a micro-batch's rows meet the logits.
            per_row[r] = d["logprobs"][k, :n].float().to("cpu", copy=True)
            ents[r] = d["entropy"][k, :n].float().to("cpu", copy=True)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        obj = [(per_row, ents)]
        src = dist.get_global_rank(ps.get_pipeline_model_parallel_group(),
                                   ps.get_pipeline_model_parallel_world_size() - 1)
        dist.broadcast_object_list(obj, src=src, group=ps.get_pipeline_model_parallel_group())
        per_row, ents = obj[0]
    return (per_row, ents) if with_entropy else per_row


def _config(model):
    chunk = model[0]
    inner = getattr(chunk, "module", chunk)
    return inner.config


class ReferenceWeights:
    """The frozen reference policy as a host-memory copy of this rank's parameter shards.

    ``with ref.active(model):`` swaps the reference weights in for a no-grad pass and restores
    the live ones after, so the reference never costs a second model on the accelerator.
    """

    def __init__(self, model):
        self._params = [p.detach().to("cpu", copy=True) for p in _params(model)]

    def active(self, model):
        return _Swap(model, self._params)


def _params(model):
    for chunk in model:
        inner = getattr(chunk, "module", chunk)
        yield from inner.parameters()


class _Swap:
    def __init__(self, model, ref_params):
        self.model, self.ref = model, ref_params

    def __enter__(self):
        self.saved = []
        for p, r in zip(_params(self.model), self.ref):
            self.saved.append(p.detach().to("cpu", copy=True))
            p.data.copy_(r)
        return self

    def __exit__(self, *exc):
        for p, s in zip(_params(self.model), self.saved):
            p.data.copy_(s)
        return False
