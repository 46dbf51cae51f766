"""Per-step metrics: JSONL always (``<run_dir>/metrics.jsonl``), TensorBoard and W&B when
configured, and a one-line progress bar. Only global rank 0 writes."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch
import torch.distributed as dist


def reduce_sums(values: dict[str, float], group=None) -> dict[str, float]:
    """Sum a dict of floats over ``group`` (all ranks in the same order of keys)."""
    if not dist.is_initialized():
        return dict(values)
    from megatron_ext.parallel import collective_device

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=collective_device(group))
    dist.all_reduce(t, group=group)
    return dict(zip(keys, t.tolist()))


def ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


class MetricsLogger:
    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool = False,
                 wandb_project: str | None = None, config: dict | None = None,
                 resume: bool = False):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = self._wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if not resume and os.path.exists(self.path):
            os.replace(self.path, self.path + f".{int(time.time())}.old")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("logging.tensorboard=true needs the tensorboard package: "
                                   "pip install 'groupwise[logging]'") from None
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed: "
                                   "pip install 'groupwise[logging]'") from None
            self._wandb = wandb.init(project=wandb_project, dir=run_dir, config=config,
                                     resume="allow")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be redone)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if json.loads(line).get("step", -1) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _clean(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
