"""Pack variable-length sequences into micro-batches by token budget (THD layout).

A row is one training sequence ``tokens`` (prompt + response) with ``loss_start``: the index of
the first token whose log-prob the loss needs (the first response token). A micro-batch
concatenates rows into one ``[t]`` stream described by ``cu_seqlens`` — THD for
TransformerEngine on GPU, a block-diagonal causal mask for :class:`megatron_ext.layers.SDPAttention`
on CPU — so no compute is spent on padding between sequences.

Per-token outputs come back left-aligned per row: ``[rows, T]`` where column 0 is the first
response token, the layout every function of ``pipeline.algorithms`` takes.
"""

from __future__ import annotations

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
    cu_seqlens: torch.Tensor  # [n_segments + 1] int32 (the padding segment included)
    max_seqlen: int
    score_index: torch.Tensor  # [rows, T] long: pack position of each row's k-th scored token
    score_mask: torch.Tensor  # [rows, T] bool

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def packed_seq_params(self):
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens,
                               cu_seqlens_kv=self.cu_seqlens, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen)

    def to_rows(self, per_token: torch.Tensor) -> torch.Tensor:
        """[t] values at pack positions -> [rows, T] left-aligned per row, 0 where masked."""
        out = per_token[self.score_index.clamp(max=per_token.numel() - 1)]
        return out * self.score_mask.to(out.dtype)


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
         pad_to_length: int | None = None) -> PackedMicroBatch:
    """Concatenate ``rows[row_ids]`` into one packed micro-batch.

    ``pad_to_multiple`` (TP under sequence parallelism) and ``pad_to_length`` (a fixed length
    for pipeline p2p) add one trailing padding segment that attends only to itself and is
    never scored.
    """
    ids, pos, tgt, cu = [], [], [], [0]
    index_rows = []
    offset = 0
    for r in row_ids:
        row = rows[r]
        n = len(row.tokens)
        if not 1 <= row.loss_start <= n:
            raise ValueError(f"row {r}: loss_start={row.loss_start} outside [1, {n}]")
        ids.extend(row.tokens)
        pos.extend(range(n))
        tgt.extend(row.tokens[1:] + [0])
        # The logit at position k predicts token k+1: scored token j sits at k = j - 1.
        index_rows.append([offset + j - 1 for j in range(row.loss_start, n)])
        offset += n
        cu.append(offset)
    total = offset
    target_len = max(total, pad_to_length or 0)
    target_len = -(-target_len // pad_to_multiple) * pad_to_multiple
    if target_len > total:
        pad = target_len - total
        ids.extend([0] * pad)
        pos.extend(range(pad))
        tgt.extend([0] * pad)
        cu.append(target_len)
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
        score_index=score_index, score_mask=score_mask)


def pack_all(rows: list[Row], token_budget: int, *, pad_to_multiple: int = 1,
             same_length: bool = False, min_microbatches: int = 1) -> list[PackedMicroBatch]:
    """All rows packed by ``token_budget``. ``same_length`` pads every pack to the longest
    (pipeline parallelism exchanges fixed-shape activations between stages)."""
    plan = plan_microbatches([len(r.tokens) for r in rows], token_budget)
    while len(plan) < min_microbatches and any(len(p) > 1 for p in plan):
        big = max(range(len(plan)), key=lambda i: len(plan[i]))
        half = len(plan[big]) // 2
        plan[big:big + 1] = [plan[big][:half], plan[big][half:]]
    longest = max((sum(len(rows[i].tokens) for i in p) for p in plan), default=0)
    return [pack(rows, p, pad_to_multiple=pad_to_multiple,
                 pad_to_length=longest if same_length else None) for p in plan]


def balance_groups(group_tokens: list[int], dp_size: int) -> list[list[int]]:
    """Assign whole groups to DP ranks, longest first to the least-loaded rank (LPT), with
    equal group counts per rank when the count divides. Returns group indices per rank."""
    per_rank = len(group_tokens) // dp_size if len(group_tokens) % dp_size == 0 else None
    loads = [0] * dp_size
    out: list[list[int]] = [[] for _ in range(dp_size)]
    for g in sorted(range(len(group_tokens)), key=lambda i: (-group_tokens[i], i)):
        ranks = [r for r in range(dp_size) if per_rank is None or len(out[r]) < per_rank]
        r = min(ranks, key=lambda k: (loads[k], k))
        out[r].append(g)
        loads[r] += group_tokens[g]
    return [sorted(o) for o in out]
