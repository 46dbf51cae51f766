"""Validation of the tensors users hand to the algorithm functions.

Every check raises a ``ValueError`` whose message names the offending argument and says what
was expected, so a wrong call fails at the boundary instead of deep inside a reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_rewards(rewards: Tensor, name: str = "rewards") -> Tensor:
    """[P,G] -> the same tensor, after checking it is 2-D, real and finite."""
    if not isinstance(rewards, Tensor) or rewards.dim() != 2:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"{name} must be a 2-D [P, G] tensor (P prompts, G responses each); "
                         f"got {shape}")
    if rewards.is_complex():
        raise ValueError(f"{name} must be real, got dtype {rewards.dtype}")
    if rewards.is_floating_point() and not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf); fix the reward "
                         f"function or drop those groups before computing advantages")
    return rewards


def check_same_shape(tensor: Tensor, name: str, like: Tensor, like_name: str) -> Tensor:
    """Any shape -> ``tensor``, after checking it has ``like``'s shape."""
    if not isinstance(tensor, Tensor) or tensor.shape != like.shape:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}; "
                         f"got {shape}")
    return tensor


def check_tokens(tensor: Tensor, name: str, rows: int | None = None) -> Tensor:
    """[B,T] -> ``tensor``, after checking it is 2-D with ``rows`` rows when given."""
    if not isinstance(tensor, Tensor) or tensor.dim() != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a 2-D [B, T] per-token tensor; got {shape}")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} must have B = P*G = {rows} rows (group-major, row j*G+i); "
                         f"got {tensor.shape[0]}")
    return tensor


def check_advantages(advantages: Tensor, like: Tensor, name: str = "advantages") -> Tensor:
    """[B] or [B,T] -> [B,1] or [B,T], broadcastable against the per-token tensor ``like``."""
    if isinstance(advantages, Tensor):
        if advantages.dim() == 1 and advantages.shape[0] == like.shape[0]:
            return advantages.unsqueeze(1)
        if advantages.shape == like.shape:
            return advantages
    shape = tuple(advantages.shape) if isinstance(advantages, Tensor) else type(advantages).__name__
    raise ValueError(f"{name} must be [B] (one per sequence) or [B, T] matching "
                     f"{tuple(like.shape)}; got {shape}")


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    """A string option -> itself, after checking it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def result_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype an estimator returns for ``tensor``: its own if floating, else the default."""
    return tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype()


def loss_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype per-token losses are computed in: at least float32, since ``exp`` of a
    bf16 log-ratio is too coarse for a clip range of 3e-4 (GSPO)."""
    return torch.promote_types(tensor.dtype, torch.float32)
