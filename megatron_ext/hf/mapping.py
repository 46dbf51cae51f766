"""Megatron <-> Hugging Face parameter names and layouts: one table per family.

Families: Llama 2/3/3.1 (``LLAMA``), Qwen2/2.5 (``QWEN2``: QKV bias), Qwen3 dense (``QWEN3``:
QK-norm). A :class:`Row` names one Megatron parameter, by its local-spec name and, where
TransformerEngine fuses a norm into the next linear, by its TE name too, and the HF tensors
it is built from. The row's layout says how they join (``h`` hidden, ``np`` query heads,
``ng`` key/value heads = query groups, ``hn`` head dim, ``ffn`` MLP width, ``V`` vocabulary,
``Vp`` Megatron's padded vocabulary):

``copy``
    one HF tensor, same shape.
``qkv``
    Megatron's grouped layout: for each of the ``ng`` query groups, its ``np/ng`` query
    heads, then its key head, then its value head -> ``[ng * (np/ng + 2) * hn, h]`` (weight)
    or ``[ng * (np/ng + 2) * hn]`` (bias), from HF ``q_proj [np*hn, h]``,
    ``k_proj [ng*hn, h]``, ``v_proj [ng*hn, h]``. Grouping keeps a TP shard (whole groups)
    contiguous. Both sides use the same half-rotation RoPE, so no head permutation.
``gate_up``
    ``[gate; up] = [2*ffn, h]`` from HF ``gate_proj`` and ``up_proj`` ``[ffn, h]``.
``vocab``
    ``[Vp, h]``: HF's ``[V, h]`` rows, then ``Vp - V`` zero rows (Megatron pads the
    vocabulary to a multiple of ``128 * TP``); export drops the padding rows again.

Everything here works on FULL (TP-unsharded) tensors with GLOBAL layer indices; sharding over
TP and ownership by PP stage are :mod:`megatron_ext.export`'s business. Every check is strict:
an unknown name, a missing or extra tensor and a shape mismatch raise
:class:`WeightMismatchError` naming the tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

COPY, QKV, GATE_UP, VOCAB = "copy", "qkv", "gate_up", "vocab"


class WeightMismatchError(ValueError):
    """A checkpoint's tensors do not match the model: names the tensor and the expectation."""


@dataclass(frozen=True)
class Row:
    """One Megatron parameter and the HF tensors it is made of.

    ``megatron`` is the local-spec name and ``te`` the TransformerEngine-spec name when it
    differs; ``{i}`` stands for the global (0-based) layer index. ``tp_dim`` is the dimension
    Megatron splits over tensor parallelism (None: replicated on every TP rank). ``exported``
    is False for the last pipeline stage's copy of a tied embedding, which HF does not store
    separately.
    """

    megatron: str
    hf: tuple[str, ...]
    layout: str = COPY
    tp_dim: int | None = None
    te: str | None = None
    exported: bool = True


_L, _HL = "decoder.layers.{i}.", "model.layers.{i}."
_ATTN = _HL + "self_attn."

EMBEDDING = Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, 0)
OUTPUT = Row("output_layer.weight", ("lm_head.weight",), VOCAB, 0)
# With tie_word_embeddings the last PP stage still holds its own copy of the embedding as
# output_layer.weight (PP=1 has none): it is loaded from the embedding and never exported.
TIED_OUTPUT = Row("output_layer.weight", ("model.embed_tokens.weight",), VOCAB, 0, exported=False)

LLAMA: tuple[Row, ...] = (
    EMBEDDING,
    Row(_L + "input_layernorm.weight", (_HL + "input_layernorm.weight",),
        te=_L + "self_attention.linear_qkv.layer_norm_weight"),
    Row(_L + "self_attention.linear_qkv.weight",
        (_ATTN + "q_proj.weight", _ATTN + "k_proj.weight", _ATTN + "v_proj.weight"), QKV, 0),
    Row(_L + "self_attention.linear_proj.weight", (_ATTN + "o_proj.weight",), COPY, 1),
    Row(_L + "pre_mlp_layernorm.weight", (_HL + "post_attention_layernorm.weight",),
        te=_L + "mlp.linear_fc1.layer_norm_weight"),
    Row(_L + "mlp.linear_fc1.weight", (_HL + "mlp.gate_proj.weight", _HL + "mlp.up_proj.weight"),
        GATE_UP, 0),
    Row(_L + "mlp.linear_fc2.weight", (_HL + "mlp.down_proj.weight",), COPY, 1),
    Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
    OUTPUT,
)
QKV_BIAS = Row(_L + "self_attention.linear_qkv.bias",
               (_ATTN + "q_proj.bias", _ATTN + "k_proj.bias", _ATTN + "v_proj.bias"), QKV, 0)
QWEN2: tuple[Row, ...] = LLAMA + (QKV_BIAS,)
QWEN3: tuple[Row, ...] = LLAMA + (
    Row(_L + "self_attention.q_layernorm.weight", (_ATTN + "q_norm.weight",)),
    Row(_L + "self_attention.k_layernorm.weight", (_ATTN + "k_norm.weight",)),
)
TABLES = {"llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3}

# Tensors transformers itself ignores on load: old checkpoints' RoPE buffers, and a stored
# lm_head next to tied embeddings (checked separately: must equal the embedding's shape).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.*)")


class HFMapping:
    """A family table bound to one HF config: names, full shapes, fusion and unfusion.

    ``hf_config``: a transformers config, a dict, or a model dir / config.json path
    (see :func:`megatron_ext.model.load_hf_config`, which rejects unknown ``model_type``).
    """

    def __init__(self, hf_config):
        from ..model import head_dim, load_hf_config

        hf = load_hf_config(hf_config)
        self.hf = hf
        self.model_type = hf.model_type
        self.tied = bool(getattr(hf, "tie_word_embeddings", False))
        self.num_layers = hf.num_hidden_layers
        self.hidden = hf.hidden_size
        self.ffn = hf.intermediate_size
        self.np = hf.num_attention_heads
        self.ng = getattr(hf, "num_key_value_heads", None) or self.np
        self.hn = head_dim(hf)
        self.vocab = hf.vocab_size
        self._check_supported()
        rows = [r for r in TABLES[self.model_type] if r is not OUTPUT]
        rows.append(TIED_OUTPUT if self.tied else OUTPUT)
        self.rows = tuple(rows)
        self._by_name = {}
        for r in self.rows:
            self._by_name[r.megatron] = r
            if r.te:
                self._by_name[r.te] = r
        self._hf_shapes = self._compute_hf_shapes()

    def _check_supported(self):
        hf = self.hf
        # HF puts attention_bias on o_proj as well for Llama/Qwen3, and mlp_bias on all three
        # MLP projections; the Megatron model has add_bias_linear=False, so those biases would
        # be silently dropped.
        if self.model_type in ("llama", "qwen3") and getattr(hf, "attention_bias", False):
            raise WeightMismatchError(
                f"{self.model_type} with attention_bias=True has an o_proj bias that the "
                "Megatron model (add_bias_linear=False) cannot hold; not supported")
        if getattr(hf, "mlp_bias", False):
            raise WeightMismatchError(f"{self.model_type} with mlp_bias=True is not supported: "
                                      "the Megatron model has no MLP biases")
        if self.np % self.ng:
            raise WeightMismatchError(f"num_attention_heads={self.np} is not a multiple of "
                                      f"num_key_value_heads={self.ng}")

    # -- names -------------------------------------------------------------------------

    def resolve(self, megatron_name: str) -> tuple[Row, int | None]:
        """(row, global layer index or None) of a Megatron parameter name (local or TE spec)
        whose ``decoder.layers.<n>`` index is already the GLOBAL layer index."""
        m = _LAYER_NAME.fullmatch(megatron_name)
        layer, key = (int(m.group(1)), "decoder.layers.{i}." + m.group(2)) if m else (None, megatron_name)
        row = self._by_name.get(key)
        if row is None:
            raise WeightMismatchError(f"Megatron parameter {megatron_name!r} has no Hugging Face "
                                      f"mapping in the {self.model_type} table")
        if layer is not None and not 0 <= layer < self.num_layers:
            raise WeightMismatchError(f"Megatron parameter {megatron_name!r}: layer {layer} is "
                                      f"outside num_hidden_layers={self.num_layers}")
        return row, layer

    @staticmethod
    def hf_names(row: Row, layer: int | None) -> list[str]:
        return [n.format(i=layer) for n in row.hf]

    @staticmethod
    def megatron_name(row: Row, layer: int | None, te: bool = False) -> str:
        return (row.te if te and row.te else row.megatron).format(i=layer)

    def all_rows(self) -> list[tuple[Row, int | None]]:
        """Every exported (row, layer) of the whole model, in HF order (embedding, layers, final
        norm, head)."""
        per_layer = [r for r in self.rows if "{i}" in r.megatron]
        tail = [r for r in self.rows if "{i}" not in r.megatron and r is not EMBEDDING
                and r.exported]
        return ([(EMBEDDING, None)] + [(r, i) for i in range(self.num_layers) for r in per_layer]
                + [(r, None) for r in tail])

    # -- shapes ------------------------------------------------------------------------

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of the full HF state dict, as ``save_pretrained`` writes it (a tied
        ``lm_head.weight`` is not stored)."""
        return dict(self._hf_shapes)

    def _compute_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        h, hn, np_, ng, ffn = self.hidden, self.hn, self.np, self.ng, self.ffn
        per_name = {
            "model.embed_tokens.weight": (self.vocab, h),
            "lm_head.weight": (self.vocab, h),
            "model.norm.weight": (h,),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (np_ * hn, h),
            "self_attn.k_proj.weight": (ng * hn, h),
            "self_attn.v_proj.weight": (ng * hn, h),
            "self_attn.q_proj.bias": (np_ * hn,),
            "self_attn.k_proj.bias": (ng * hn,),
            "self_attn.v_proj.bias": (ng * hn,),
            "self_attn.o_proj.weight": (h, np_ * hn),
            "self_attn.q_norm.weight": (hn,),
            "self_attn.k_norm.weight": (hn,),
            "mlp.gate_proj.weight": (ffn, h),
            "mlp.up_proj.weight": (ffn, h),
            "mlp.down_proj.weight": (h, ffn),
        }
        shapes = {}
        for row, layer in self.all_rows():
            for name in self.hf_names(row, layer):
                key = name.split(".", 3)[3] if name.startswith("model.layers.") else name
                shapes[name] = per_name[key]
        return shapes

    def megatron_shape(self, row: Row, padded_vocab: int) -> tuple[int, ...]:
        """Full (TP-unsharded) shape of the Megatron parameter of ``row``."""
        shapes = self._hf_shapes
        parts = [shapes[n] for n in self.hf_names(row, 0 if "{i}" in row.megatron else None)]
        if row.layout == VOCAB:
            return (padded_vocab,) + parts[0][1:]
        if row.layout in (QKV, GATE_UP):
            return (sum(p[0] for p in parts),) + parts[0][1:]
        return parts[0]

    def check_hf_tensors(self, shapes: Mapping[str, Sequence[int]], source: str) -> None:
        """Strict check of a checkpoint's name -> shape table against the config.

        Raises :class:`WeightMismatchError` naming the missing, extra or mis-shaped tensors
        (``source`` says where they came from, e.g. the checkpoint directory).
        """
        expected = self._hf_shapes
        names = set(shapes)
        missing = sorted(set(expected) - names)
        extra = sorted(n for n in names - set(expected) if not self.is_ignored(n))
        if missing:
            raise WeightMismatchError(f"{source}: missing {len(missing)} tensor(s) the "
                                      f"{self.model_type} config needs: {_first(missing)}")
        if extra:
            raise WeightMismatchError(f"{source}: {len(extra)} unexpected tensor(s) for a "
                                      f"{self.model_type} model with num_hidden_layers="
                                      f"{self.num_layers}: {_first(extra)}")
        for name, exp in expected.items():
            self.check_shape(name, tuple(shapes[name]), source)
        if self.tied and "lm_head.weight" in names:
            self.check_shape("lm_head.weight", tuple(shapes["lm_head.weight"]), source,
                             expected["model.embed_tokens.weight"])

    def is_ignored(self, name: str) -> bool:
        """True for tensors a loader skips: what transformers ignores too (see ``_IGNORED``)."""
        return bool(_IGNORED.fullmatch(name)) or (self.tied and name == "lm_head.weight")

    def check_shape(self, name: str, shape: tuple[int, ...], source: str,
                    expected: tuple[int, ...] | None = None) -> None:
        exp = self._hf_shapes[name] if expected is None else expected
        if tuple(shape) != tuple(exp):
            raise WeightMismatchError(
                f"{source}: tensor {name} has shape {tuple(shape)}, expected {tuple(exp)} from the "
                f"config (hidden_size={self.hidden}, num_attention_heads={self.np}, "
                f"num_key_value_heads={self.ng}, head_dim={self.hn}, intermediate_size={self.ffn}, "
                f"vocab_size={self.vocab})")

    # -- layouts -----------------------------------------------------------------------

    def to_hf(self, row: Row, layer: int | None, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Full Megatron tensor of ``row`` -> its HF ``(name, tensor)`` pairs (empty for the tied
        copy). Padding rows are dropped; q/k/v and gate/up are split. Same dtype."""
        if not row.exported:
            return []
        names = self.hf_names(row, layer)
        if row.layout == VOCAB:
            if full.shape[0] < self.vocab or full.shape[1:] != (self.hidden,):
                raise WeightMismatchError(
                    f"Megatron parameter {self.megatron_name(row, layer)} has shape "
                    f"{tuple(full.shape)}; expected [padded vocab >= {self.vocab}, {self.hidden}]")
            return [(names[0], full[: self.vocab])]
        want = self.megatron_shape(row, 0)
        if tuple(full.shape) != want:
            raise WeightMismatchError(f"Megatron parameter {self.megatron_name(row, layer)} has "
                                      f"shape {tuple(full.shape)}, expected {want}")
        if row.layout == QKV:
            return list(zip(names, split_qkv(full, self.np, self.ng, self.hn)))
        if row.layout == GATE_UP:
            return list(zip(names, full.chunk(2, dim=0)))
        return [(names[0], full)]

    def from_hf(self, row: Row, layer: int | None, tensors: Sequence[torch.Tensor],
                padded_vocab: int, source: str = "checkpoint") -> torch.Tensor:
        """HF tensors of ``row`` (in ``row.hf`` order) -> the full Megatron tensor. Shapes are
        checked against the config (``source`` names where the tensors came from)."""
        out = tensors[0].new_empty(self.megatron_shape(row, padded_vocab))
        self.from_hf_into(row, layer, tensors, out, source=source)
        return out

    def from_hf_into(self, row: Row, layer: int | None, tensors: Sequence[torch.Tensor],
                     out: torch.Tensor, *, tp: int = 1, rank: int = 0,
                     source: str = "checkpoint") -> None:
        """Write TP rank ``rank``'s shard of the Megatron tensor of ``row`` straight into
        ``out`` (contiguous; any dtype: values are cast), never building the full tensor.

        ``out`` has the full Megatron shape split ``tp`` ways on ``row.tp_dim`` (replicated rows
        ignore ``tp``): vocabulary rows ``[rank * Vp/tp, (rank + 1) * Vp/tp)`` with zeros past
        ``V``; query groups ``[rank * ng/tp, (rank + 1) * ng/tp)`` of the grouped QKV layout;
        rows ``[rank * ffn/tp, ...)`` of gate then of up; a plain slice otherwise.
        """
        names = self.hf_names(row, layer)
        for name, t in zip(names, tensors):
            self.check_shape(name, tuple(t.shape), source)
        if row.tp_dim is None:
            tp, rank = 1, 0
        if row.layout == VOCAB:
            rows, emb = out.shape[0], tensors[0]
            self._check_out(row, layer, out, (rows,) + tuple(emb.shape[1:]), tp)
            if rows * tp < self.vocab:
                raise WeightMismatchError(f"padded vocabulary {rows * tp} is smaller than "
                                          f"vocab_size={self.vocab}")
            start = rank * rows
            n = max(0, min(rows, self.vocab - start))
            out[:n].copy_(emb[start:start + n])
            out[n:].zero_()
        elif row.layout == QKV:
            q, k, v = tensors
            per, ng_r, rest = self.np // self.ng, self.ng // tp, tuple(q.shape[1:])
            self._check_out(row, layer, out, (ng_r * (per + 2) * self.hn,) + rest, tp)
            groups = out.view(ng_r, per + 2, self.hn, *rest)
            mine = slice(rank * ng_r, (rank + 1) * ng_r)
            groups[:, :per].copy_(q.view(self.ng, per, self.hn, *rest)[mine])
            groups[:, per].copy_(k.view(self.ng, self.hn, *rest)[mine])
            groups[:, per + 1].copy_(v.view(self.ng, self.hn, *rest)[mine])
        elif row.layout == GATE_UP:
            gate, up = tensors
            f = self.ffn // tp
            self._check_out(row, layer, out, (2 * f,) + tuple(gate.shape[1:]), tp)
            out[:f].copy_(gate[rank * f:(rank + 1) * f])
            out[f:].copy_(up[rank * f:(rank + 1) * f])
        else:
            t = tensors[0]
            if tp > 1:
                t = t.chunk(tp, dim=row.tp_dim)[rank]
            self._check_out(row, layer, out, tuple(t.shape), tp)
            out.copy_(t)

    def _check_out(self, row: Row, layer: int | None, out: torch.Tensor, want: tuple, tp: int):
        if tuple(out.shape) != tuple(want):
            raise WeightMismatchError(f"Megatron parameter {self.megatron_name(row, layer)} has "
                                      f"shape {tuple(out.shape)}, expected {tuple(want)} at TP={tp}")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ng: int, hn: int) -> torch.Tensor:
    """q [np*hn, *r], k [ng*hn, *r], v [ng*hn, *r] -> [ng * (np/ng + 2) * hn, *r], grouped."""
    rest = tuple(q.shape[1:])
    parts = [q.reshape(ng, -1, hn, *rest), k.reshape(ng, 1, hn, *rest), v.reshape(ng, 1, hn, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, np_: int, ng: int, hn: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`fuse_qkv`: [ng * (np/ng + 2) * hn, *r] -> (q, k, v), contiguous."""
    rest = tuple(qkv.shape[1:])
    g = qkv.reshape(ng, np_ // ng + 2, hn, *rest)
    return (g[:, : np_ // ng].reshape(np_ * hn, *rest), g[:, -2].reshape(ng * hn, *rest),
            g[:, -1].reshape(ng * hn, *rest))


def _first(names: list[str], n: int = 6) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
