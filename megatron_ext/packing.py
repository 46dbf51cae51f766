"""Pack variable-length sequences into micro-batches by token budget (THD layout).

A row is one training sequence ``tokens`` (prompt + response) with ``loss_start``: the index of
the first token whose log-prob the loss needs (the first response token). A micro-batch
concatenates rows into one ``[t]`` stream described by ``cu_seqlens`` — THD for
TransformerEngine on GPU, a block-diagonal causal mask for :class:`megatron_ext.layers.SDPAttention`
on CPU — so no compute is spent on padding between sequences.

Per-token outputs come back left-aligned per row: ``[rows, T]`` where column 0 is the first
response token, the layout every function of ``pipeline.algorithms`` takes.

Context parallelism: every sequence is padded to a multiple of ``2 * CP`` and cut into ``2 * CP``
chunks; CP rank ``r`` holds chunks ``r`` and ``2 * CP - 1 - r`` of every sequence (Megatron's
causal load balancing), see :func:`split_for_context_parallel`. ``cu_seqlens`` stay global.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass
class Row:
    tokens: list[int]  # the whole sequence
    loss_start: int  # first position whose token is predicted and scored (>= 1)

    @property
    def n_scored(self) -> int:
        return len(self.tokens) - self.loss_start


@dataclass
class PackedMicroBatch:
    """One micro-batch: rows concatenated (plus a padding segment to a length multiple)."""

    row_ids: list[int]  # indices into the caller's row list, in pack order
    input_ids: torch.Tensor  # [t] long
    position_ids: torch.Tensor  # [t] long, restarting at 0 per sequence
    targets: torch.Tensor  # [t] long: next token within the sequence (0 where unused)
    cu_seqlens: torch.Tensor  # [n_segments + 1] int32, padded lengths (padding segment included)
    max_seqlen: int
    score_index: torch.Tensor  # [rows, T] long: pack position of each row's k-th scored token
    score_mask: torch.Tensor  # [rows, T] bool: the rows' scored tokens (whole sequences)
    # Unpadded lengths when sequences were padded (TransformerEngine's cu_seqlens vs
    # cu_seqlens_padded); None when every sequence is its own length.
    cu_seqlens_unpadded: torch.Tensor | None = None
    # Under context parallelism: which scored tokens this rank holds (score_index then points
    # into the local tokens); None when the rank holds the whole pack.
    held_mask: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def packed_seq_params(self):
        from megatron.core.packed_seq_params import PackedSeqParams

        if self.cu_seqlens_unpadded is None:
            return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens,
                                   cu_seqlens_kv=self.cu_seqlens, max_seqlen_q=self.max_seqlen,
                                   max_seqlen_kv=self.max_seqlen)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens_unpadded,
                               cu_seqlens_kv=self.cu_seqlens_unpadded,
                               cu_seqlens_q_padded=self.cu_seqlens, cu_seqlens_kv_padded=self.cu_seqlens,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)

    def to(self, device) -> "PackedMicroBatch":
        """The index and token tensors on ``device`` (the model's; TransformerEngine reads
        ``cu_seqlens`` on the GPU)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    def to_rows(self, per_token: torch.Tensor) -> torch.Tensor:
        """[t] values at (this rank's) pack positions -> [rows, T] left-aligned per row, 0 where
        masked or, under context parallelism, held by another rank."""
        mask = self.score_mask if self.held_mask is None else self.held_mask
        out = per_token[self.score_index.clamp(max=per_token.numel() - 1)]
        # where, not a product: masked slots point at some real position, and a NaN there
        # (a diverging step) must not leak into every row through 0 * NaN.
        return torch.where(mask.to(out.device), out, out.new_zeros(()))


def plan_microbatches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Row indices per micro-batch: first-fit decreasing so every pack holds at most
    ``token_budget`` tokens (a longer row gets a pack of its own). Deterministic."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for p, free in enumerate(room):
            if lengths[i] <= free:
                packs[p].append(i)
                room[p] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(token_budget - lengths[i])
    return [sorted(p) for p in packs]


def pack(rows: list[Row], row_ids: list[int], *, pad_to_multiple: int = 1,
         pad_to_length: int | None = None, seq_multiple: int = 1) -> PackedMicroBatch:
    """Concatenate ``rows[row_ids]`` into one packed micro-batch.

    ``seq_multiple`` pads every sequence at its end to a multiple (``2 * CP``: each sequence is
    cut into ``2 * CP`` equal chunks); the padding is causal-after the real tokens, so it changes
    nothing they see, and it is never scored. ``pad_to_multiple`` (TP under sequence
    parallelism, FP8 GEMM shapes) and ``pad_to_length`` (a fixed length for pipeline p2p) add
    one trailing padding segment that attends only to itself and is never scored; it must be a
    multiple of ``seq_multiple`` too, so ``pad_to_multiple`` should be one.
    """
    if pad_to_multiple % seq_multiple:
        raise ValueError(f"pad_to_multiple={pad_to_multiple} is not a multiple of "
                         f"seq_multiple={seq_multiple}")
    ids, pos, tgt, cu, cu_real = [], [], [], [0], [0]
    index_rows = []
    offset = 0
    for r in row_ids:
        row = rows[r]
        n = len(row.tokens)
        if not 1 <= row.loss_start <= n:
            raise ValueError(f"row {r}: loss_start={row.loss_start} outside [1, {n}]")
        padded = -(-n // seq_multiple) * seq_multiple
        ids.extend(row.tokens + [0] * (padded - n))
        pos.extend(range(padded))
        tgt.extend(row.tokens[1:] + [0] * (padded - n + 1))
        # The logit at position k predicts token k+1: scored token j sits at k = j - 1.
        index_rows.append([offset + j - 1 for j in range(row.loss_start, n)])
        offset += padded
        cu.append(offset)
        cu_real.append(cu_real[-1] + n)
    total = offset
    target_len = max(total, pad_to_length or 0)
    target_len = -(-target_len // pad_to_multiple) * pad_to_multiple
    if target_len > total:
        pad = target_len - total
        ids.extend([0] * pad)
        pos.extend(range(pad))
        tgt.extend([0] * pad)
        cu.append(target_len)
        cu_real.append(cu_real[-1] + pad)
    width = max((len(r) for r in index_rows), default=0)
    score_index = torch.zeros(len(index_rows), max(width, 1), dtype=torch.long)
    score_mask = torch.zeros(len(index_rows), max(width, 1), dtype=torch.bool)
    for i, idx in enumerate(index_rows):
        score_index[i, :len(idx)] = torch.tensor(idx, dtype=torch.long)
        score_mask[i, :len(idx)] = True
    cu_t = torch.tensor(cu, dtype=torch.int32)
    return PackedMicroBatch(
        row_ids=list(row_ids), input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long), targets=torch.tensor(tgt, dtype=torch.long),
        cu_seqlens=cu_t, max_seqlen=int((cu_t[1:] - cu_t[:-1]).max()),
        score_index=score_index, score_mask=score_mask,
        cu_seqlens_unpadded=None if cu_real == cu else torch.tensor(cu_real, dtype=torch.int32))


def pack_all(rows: list[Row], token_budget: int, *, pad_to_multiple: int = 1,
             same_length: bool = False, count_multiple: int = 1,
             seq_multiple: int = 1) -> list[PackedMicroBatch]:
    """All rows packed by ``token_budget`` (counted after padding each sequence to
    ``seq_multiple``). ``same_length`` pads every pack to the longest (pipeline parallelism
    exchanges fixed-shape activations between stages).

    ``count_multiple``: the number of packs is made a multiple of it (megatron-core's
    interleaved schedule runs micro-batches in groups of PP). The pack with the most rows is
    halved until it is; with too few rows to split, padding-only packs (no rows, nothing
    scored) make up the rest.
    """
    lengths = [-(-len(r.tokens) // seq_multiple) * seq_multiple for r in rows]
    plan = plan_microbatches(lengths, token_budget)
    while len(plan) % count_multiple and any(len(p) > 1 for p in plan):
        big = max(range(len(plan)), key=lambda i: (len(plan[i]), sum(lengths[j] for j in plan[i])))
        half = len(plan[big]) // 2
        plan[big:big + 1] = [plan[big][:half], plan[big][half:]]
    plan += [[] for _ in range(-len(plan) % count_multiple)]
    longest = max((sum(lengths[i] for i in p) for p in plan), default=0)
    if not same_length and any(not p for p in plan):
        raise ValueError("padding-only packs need same_length=True (their length is the longest pack's)")
    return [pack(rows, p, pad_to_multiple=pad_to_multiple, seq_multiple=seq_multiple,
                 pad_to_length=longest if same_length else None) for p in plan]


def cp_token_positions(seq_lens: torch.Tensor, cp_size: int, cp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence id and position [t_local] of each token a CP rank holds (load-balanced split).

    Each sequence (length divisible by 2*cp_size) is cut into 2*cp chunks; rank r holds chunks
    r and 2*cp-1-r, concatenated, sequence after sequence: Megatron's causal load balancing
    (chunk r is cheap under a causal mask, chunk 2*cp-1-r expensive, so ranks do equal work).
    """
    seq_ids, positions = [], []
    for i, n in enumerate(seq_lens.tolist()):
        if n % (2 * cp_size):
            raise ValueError(f"sequence {i} has {n} tokens, not a multiple of 2 * CP = {2 * cp_size}")
        chunk = n // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            positions.append(torch.arange(c * chunk, (c + 1) * chunk))
            seq_ids.append(torch.full((chunk,), i))
    return torch.cat(seq_ids), torch.cat(positions)


def split_for_context_parallel(mb: PackedMicroBatch, cp_size: int, cp_rank: int) -> PackedMicroBatch:
    """This CP rank's share of a packed micro-batch: tokens of chunks (r, 2*CP-1-r) of every
    sequence, in pack order; ``cu_seqlens`` stay global (attention and RoPE need the full
    sequence boundaries); ``score_index`` points into the local tokens and ``held_mask`` marks
    the scored tokens this rank holds. ``score_mask`` still describes whole rows, which is what
    the loss needs once the ranks' partial rows are summed."""
    if cp_size == 1:
        return mb
    seq, pos = cp_token_positions(mb.cu_seqlens[1:] - mb.cu_seqlens[:-1], cp_size, cp_rank)
    held = mb.cu_seqlens[:-1].to(torch.long)[seq] + pos  # global pack positions, local order
    local_of = torch.full((mb.num_tokens,), -1, dtype=torch.long)
    local_of[held] = torch.arange(held.numel())
    local_index = local_of[mb.score_index]
    return dataclasses.replace(
        mb, input_ids=mb.input_ids[held], position_ids=mb.position_ids[held],
        targets=mb.targets[held], score_index=local_index.clamp(min=0),
        held_mask=(local_index >= 0) & mb.score_mask)


def pad_multiples(*, tp: int = 1, sequence_parallel: bool = False, cp: int = 1,
                  fp8_multiple: int = 1) -> tuple[int, int]:
    """(seq_multiple, pad_to_multiple) for :func:`pack_all` under a parallel layout.

    Under CP every sequence is a multiple of ``2 * CP`` (times TP under sequence parallelism,
    so each TP rank's slice of each CP chunk is whole, as TransformerEngine's THD kernels
    expect). The whole pack: each rank's local token count (``t / (CP * TP)`` under SP) a
    multiple of ``fp8_multiple`` (FP8 GEMMs need 16, MXFP8 32).
    """
    tp_sp = tp if sequence_parallel else 1
    seq_multiple = 2 * cp * tp_sp if cp > 1 else 1
    return seq_multiple, math.lcm(seq_multiple, cp * tp_sp * fp8_multiple)


def balance_by_swaps(tokens: list[list[int]], max_swaps: int | None = None) -> list[list[tuple[int, int]]]:
    """Even out DP ranks' token loads by swapping whole groups, keeping group counts per rank.

    ``tokens[r][i]``: tokens of rank r's i-th group. Returns, per rank and slot, the
    ``(rank, index)`` of the group it holds afterwards. Each swap exchanges one group of the
    heaviest rank with a lighter group of the lightest rank that has one (the pair that best
    halves their gap), so most groups stay where they were generated and few travel. Every
    swap strictly lowers the sum of squared loads, so it ends; deterministic on every rank.
    """
    held = [[(r, i) for i in range(len(ts))] for r, ts in enumerate(tokens)]
    load = [list(ts) for ts in tokens]
    totals = [sum(ts) for ts in load]
    limit = sum(len(ts) for ts in tokens) if max_swaps is None else max_swaps
    for _ in range(limit):
        hi = max(range(len(totals)), key=lambda r: (totals[r], -r))
        best = None
        for lo in sorted(range(len(totals)), key=lambda r: (totals[r], r)):
            if totals[lo] >= totals[hi]:
                break
            best = _best_swap(load[hi], load[lo], totals[hi] - totals[lo])
            if best is not None:
                break
        if best is None:
            break
        _, i, j = best
        d = load[hi][i] - load[lo][j]
        load[hi][i], load[lo][j] = load[lo][j], load[hi][i]
        held[hi][i], held[lo][j] = held[lo][j], held[hi][i]
        totals[hi] -= d
        totals[lo] += d
    return held


def _best_swap(heavy: list[int], light: list[int], gap: int) -> tuple | None:
    """(|gap - 2d|, i, j) of the swap heavy[i] <-> light[j] with 0 < d = heavy[i] - light[j]
    < gap closest to halving the gap (ties: smallest i, then j), or None. O(n log n): for each
    heavy group only the light groups nearest ``heavy[i] - gap / 2`` can be best."""
    order = sorted(range(len(light)), key=lambda j: (light[j], j))
    values = [light[j] for j in order]
    best = None
    for i, a in enumerate(heavy):
        p = bisect.bisect_left(values, a - gap / 2)
        for q in (p - 1, p):
            if not 0 <= q < len(values):
                continue
            q = bisect.bisect_left(values, values[q])  # first of equal values: smallest j
            d = a - values[q]
            if 0 < d < gap:
                cand = (abs(gap - 2 * d), i, order[q])
                if best is None or cand < best:
                    best = cand
    return best
