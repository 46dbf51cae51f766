"""Next-token sampling with per-row temperature, top-k, top-p and random draws.

Pure tensor math, shared by every batch the embedded engine runs. Each row brings its
own parameters and its own uniform draw, so a row's token depends only on its logits
and its draw, never on the other rows of the batch (the stand-in server batches
unrelated requests together, and results must not depend on that).
"""

from __future__ import annotations

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32, temperature/top_p/uniform [B] float32, top_k [B] int64 -> tokens [B], logprobs [B].

    ``temperature == 0`` rows are greedy. ``top_k`` is clamped to [1, V] (pass V or more
    for no limit). Sampling is by inverse CDF over the vocabulary sorted by probability
    (stable sort, so ties resolve by token id), restricted to the top-k / top-p nucleus:
    token = first sorted index whose cumulative kept mass exceeds ``uniform * kept_mass``.

    Returned log-probs are ``log_softmax(logits / T)`` at the chosen token, taken before
    the top-k/top-p truncation (SGLang's definition; T = 1 for greedy rows).
    """
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    logp = torch.log_softmax(logits / scale[:, None], dim=-1)

    sorted_logp, order = torch.sort(logp, dim=-1, descending=True, stable=True)
    probs = sorted_logp.exp()
    rank = torch.arange(vocab, device=logits.device)
    keep = rank[None, :] < top_k.clamp(1, vocab)[:, None]
    # Nucleus: keep a token while the mass strictly before it is below top_p; the most
    # likely token is always kept, so every row has a non-empty support.
    mass_before = probs.cumsum(-1) - probs
    keep &= mass_before < top_p[:, None]
    keep[:, 0] = True
    kept = probs * keep
    cdf = kept.cumsum(-1)
    target = uniform * cdf[:, -1]
    pick = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)
    # u * mass can round up to exactly the kept mass; stay inside the kept prefix.
    pick = torch.minimum(pick, keep.sum(-1) - 1)
    pick = torch.where(greedy, torch.zeros_like(pick), pick)

    tokens = order.gather(-1, pick[:, None]).squeeze(-1)
    logprobs = sorted_logp.gather(-1, pick[:, None]).squeeze(-1)
    return tokens, logprobs
