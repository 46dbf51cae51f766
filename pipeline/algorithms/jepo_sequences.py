"""Build JEPO training sequences: the sampled chain of thought cut at the delimiter, then the
reference answer (spec section 5).

Design choice: the cut works on token ids plus a ``decode`` callable (``tokenizer.decode``)
rather than on text offsets, because the rollout engine hands back token ids and re-tokenising
text would change the sampled tokens. The cut keeps whole tokens: the shortest prefix whose
decoded text contains the delimiter (case-insensitive), found by bisection in O(log L) decodes.
If the delimiter ends inside a token, that token is kept whole. The reference answer tokens
are the caller's tokenisation of ``a*`` (usually with its leading space).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

DEFAULT_DELIMITER = "The final answer is"


@dataclass(frozen=True)
class JepoSequence:
    """One sample's response side: ``tokens[L]`` with ``cot_mask[L]`` and ``answer_mask[L]``.

    ``formatted``: the delimiter was found. ``valid``: formatted and ``a*`` is non-empty; only
    valid samples enter the bound. An unformatted sample keeps its whole response as CoT (the
    formatting penalty applies to every sampled token) and has no answer tokens.
    """

    tokens: Tensor  # LongTensor[L]
    cot_mask: Tensor  # BoolTensor[L]
    answer_mask: Tensor  # BoolTensor[L]
    valid: bool
    formatted: bool


def delimiter_cut(response_ids: Sequence[int], decode: Callable[[list[int]], str],
                  delimiter: str = DEFAULT_DELIMITER) -> int | None:
    """L response ids -> the number of leading tokens up to and including the first
    (case-insensitive) occurrence of ``delimiter``, or None when it does not occur."""
    needle = delimiter.lower()
    if not needle:
        raise ValueError("delimiter must be a non-empty string")
    ids = list(response_ids)
    if needle not in decode(ids).lower():
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if needle in decode(ids[:mid]).lower():
            hi = mid
        else:
            lo = mid + 1
    return lo


def build_jepo_sequence(response_ids: Sequence[int], answer_ids: Sequence[int],
                        decode: Callable[[list[int]], str], *,
                        delimiter: str = DEFAULT_DELIMITER,
                        eos_id: int | None = None) -> JepoSequence:
    """L sampled ids, A reference-answer ids -> ``c_i + a*`` (+ EOS when ``eos_id`` is given,
    scored as part of the answer) with its masks; see :class:`JepoSequence`."""
    response = [int(t) for t in response_ids]
    cut = delimiter_cut(response, decode, delimiter)
    if cut is None:
        n = len(response)
        return JepoSequence(tokens=torch.tensor(response, dtype=torch.long),
                            cot_mask=torch.ones(n, dtype=torch.bool),
                            answer_mask=torch.zeros(n, dtype=torch.bool),
                            valid=False, formatted=False)
    answer = [int(t) for t in answer_ids]
    if answer and eos_id is not None:
        answer.append(int(eos_id))
    tokens = response[:cut] + answer
    is_answer = torch.arange(len(tokens)) >= cut
    return JepoSequence(tokens=torch.tensor(tokens, dtype=torch.long), cot_mask=~is_answer,
                        answer_mask=is_answer, valid=bool(answer), formatted=True)


def pad_jepo_sequences(sequences: Sequence[JepoSequence], *, pad_id: int = 0
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """B sequences -> (tokens[B,T], cot_mask[B,T], answer_mask[B,T], valid[B], formatted[B]),
    left-aligned and right-padded with ``pad_id`` to the longest; masks are False on padding."""
    width = max((len(s.tokens) for s in sequences), default=0)
    b = len(sequences)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    cot = torch.zeros(b, width, dtype=torch.bool)
    answer = torch.zeros(b, width, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        n = len(seq.tokens)
        tokens[row, :n] = seq.tokens
        cot[row, :n] = seq.cot_mask
        answer[row, :n] = seq.answer_mask
    valid = torch.tensor([s.valid for s in sequences], dtype=torch.bool)
    formatted = torch.tensor([s.formatted for s in sequences], dtype=torch.bool)
    return tokens, cot, answer, valid, formatted
