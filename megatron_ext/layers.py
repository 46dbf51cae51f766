"""Local (non-TransformerEngine) layers for the Megatron layer spec: torch SDPA attention and norms.

Used when TransformerEngine is not importable or CUDA is absent. Two modules:

- :class:`SDPAttention`, a core attention on ``torch.nn.functional.scaled_dot_product_attention``
  that never builds a ``[b, h, s, s]`` score tensor in Python, accepts packed sequences
  (``PackedSeqParams`` with ``qkv_format="thd"``, attended as a block-diagonal causal mask)
  and context parallelism (K/V all-gathered over the CP group; load-balanced chunks).
- :class:`TorchNorm`, torch ``RMSNorm``/``LayerNorm`` whose parameters carry
  ``sequence_parallel=True`` under sequence parallelism, so megatron-core all-reduces their
  gradients over TP (Megatron's own ``WrappedTorchNorm`` refuses sequence parallelism).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from .packing import cp_token_positions


class TorchNorm:
    """Norm for the layer spec: [*, hidden] -> [*, hidden]; SP-tagged when needed.

    A class whose ``__new__`` returns a torch module, because Megatron's ``build_module``
    instantiates classes but returns plain functions uncalled. The extras Megatron passes
    (``persist_layer_norm`` ...) do not apply to torch norms and are ignored.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        return _build_norm(config, hidden_size, eps)


class TorchQKNorm:
    """Per-head norm for Qwen3's QK-norm: [*, head_dim] -> [*, head_dim].

    Not SP-tagged: megatron-core sums q/k-norm gradients over TP by parameter name already.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        if config.normalization != "RMSNorm":
            raise ValueError("QK-norm is implemented for normalization='RMSNorm' only")
        return torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)


def _build_norm(config, hidden_size: int, eps: float) -> torch.nn.Module:
    if config.normalization == "RMSNorm":
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    elif config.normalization == "LayerNorm":
        norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    else:
        raise ValueError(f"normalization={config.normalization!r}: expected RMSNorm or LayerNorm")
    if config.sequence_parallel:
        # Each TP rank normalises a different slice of the sequence, so each holds a partial
        # gradient; finalize_model_grads sums exactly the params tagged like this over TP.
        for p in norm.parameters():
            p.sequence_parallel = True
    return norm


class _AllGatherCP(torch.autograd.Function):
    """[s_local, ...] per CP rank -> [cp * s_local, ...] concatenated in rank order.

    Backward reduce-scatters (sums) because every rank's queries attended to every rank's
    keys/values: the gradient of a local K/V shard is the sum of all ranks' contributions.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        parts = list(grad.contiguous().chunk(world, dim=0))
        parts = [p.contiguous() for p in parts]
        out = torch.empty_like(parts[0])
        # gloo has no reduce_scatter: all-reduce and keep our slice (CP on CPU is for tests).
        if dist.get_backend(ctx.group) == "gloo":
            full = grad.contiguous().clone()
            dist.all_reduce(full, group=ctx.group)
            out = full.chunk(world, dim=0)[dist.get_rank(ctx.group)].contiguous()
        else:
            dist.reduce_scatter(out, parts, group=ctx.group)
        return out, None


class SDPAttention(MegatronModule):
    """Core attention on torch SDPA. sbhd: q [s, b, np, hn], k/v [s, b, ng, hn] -> [s, b, np*hn];
    thd (packed): q [t, np, hn] -> [t, np*hn]. Heads are already split over TP; under CP the
    sequence dimension holds this rank's load-balanced chunks."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__(config=config)
        from megatron.core import parallel_state

        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if pg_collection is not None and hasattr(pg_collection, "cp"):
            self.cp_group = pg_collection.cp
        else:
            self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        self.cp_size = config.context_parallel_size

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention_bias")
        dropout = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_packed(query, key, value, packed_seq_params, dropout)
        s, b = query.shape[0], query.shape[1]
        if self.cp_size > 1:
            key = _AllGatherCP.apply(key, self.cp_group)
            value = _AllGatherCP.apply(value, self.cp_group)
            n_full = s * self.cp_size
            mask = self._cp_mask(torch.tensor([n_full]), torch.tensor([n_full]), query.device)
            out = self._sdpa(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                             value.permute(1, 2, 0, 3), mask, False, dropout)
        else:
            out = self._sdpa(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                             value.permute(1, 2, 0, 3), None, True, dropout)
        # [b, np, s, hn] -> [s, b, np*hn]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _forward_packed(self, query, key, value, params, dropout):
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        seq_lens = (cu[1:] - cu[:-1]).cpu()
        t = query.shape[0]
        if self.cp_size > 1:
            key = _AllGatherCP.apply(key, self.cp_group)
            value = _AllGatherCP.apply(value, self.cp_group)
            mask = self._cp_mask(seq_lens, seq_lens, query.device)
            out = self._sdpa(query.permute(1, 0, 2).unsqueeze(0), key.permute(1, 0, 2).unsqueeze(0),
                             value.permute(1, 0, 2).unsqueeze(0), mask, False, dropout)
            return out.squeeze(0).permute(1, 0, 2).reshape(t, -1)
        # One padded batch of the pack's sequences, [n, heads, L_max, dim]: the cost is
        # n * L_max^2 instead of t^2 for a block-diagonal mask over the whole pack.
        n, width = len(seq_lens), int(seq_lens.max())
        starts = cu[:-1].to(torch.long).cpu()
        pos = torch.arange(width)
        valid = pos[None, :] < seq_lens[:, None]  # [n, L]
        index = (starts[:, None] + pos[None, :]).clamp(max=t - 1).to(query.device)

        def batch(x):  # [t, h, d] -> [n, h, L, d]
            return x[index].permute(0, 2, 1, 3)

        # Causal within each sequence, padded keys masked; padded queries still see key 0, so
        # no row is fully masked (no NaN), and their outputs are dropped below.
        mask = (pos[:, None] >= pos[None, :])[None, None] & valid[:, None, None, :]
        out = self._sdpa(batch(query), batch(key), batch(value), mask.to(query.device), False, dropout)
        out = out.permute(0, 2, 1, 3)[valid.to(query.device)]  # [t_real, h, d], pack order
        if out.shape[0] < t:  # cu_seqlens does not cover trailing positions: keep them zero
            out = torch.cat([out, out.new_zeros(t - out.shape[0], *out.shape[1:])])
        return out.reshape(t, -1)

    def _cp_mask(self, q_lens, k_lens, device):
        """Bool [t_q_local, t_k_gathered] causal mask between this rank's queries and all keys."""
        rank = dist.get_rank(self.cp_group)
        q_seq, q_pos = cp_token_positions(q_lens, self.cp_size, rank)
        # Keys arrive all-gathered in CP rank order: each rank's local tokens, one after another.
        k_seq, k_pos = (torch.cat(parts) for parts in zip(
            *(cp_token_positions(k_lens, self.cp_size, r) for r in range(self.cp_size))))
        mask = (q_seq[:, None] == k_seq[None, :]) & (q_pos[:, None] >= k_pos[None, :])
        return mask.to(device)

    def _sdpa(self, q, k, v, mask, causal, dropout):
        """q [b, np, sq, hn], k/v [b, ng, sk, hn] -> [b, np, sq, hn]; GQA by head repetition."""
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=causal, scale=self.softmax_scale)
