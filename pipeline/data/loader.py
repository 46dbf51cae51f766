"""Prompt batches in a deterministic, resumable order, and the data-parallel split of a batch."""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import numpy as np

from pipeline.data.config import DataError
from pipeline.data.prompts import PromptDataset, PromptRecord, Skipped

T = TypeVar("T")


class PromptLoader:
    """An endless iterator of batches (lists of `batch_size` `PromptRecord`s), epoch after epoch.

    Epoch e visits the usable rows in the permutation drawn from (seed, e) alone, so the order
    depends on nothing but the config, and `state_dict()` (epoch, position, counters) is all a
    resumed run needs to continue with exactly the prompts an uninterrupted run would see.
    Skipped rows (too long, bad under on_bad_row: skip) are passed over and counted; a batch is
    always full, taking its tail from the next epoch when one ends.
    """

    def __init__(self, dataset: PromptDataset, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"PromptLoader: batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise DataError(f"data.paths {dataset.config.paths}: no usable rows ({dataset.bad_rows} bad rows skipped)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)
        self._counts = {"prompts": 0, "skipped_long_prompts": 0, "skipped_bad_rows": 0}

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            cfg = self.dataset.config
            n = len(self.dataset)
            self._order = np.random.default_rng([cfg.seed, epoch]).permutation(n) if cfg.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> "PromptLoader":
        return self

    def __next__(self) -> list[PromptRecord]:
        batch: list[PromptRecord] = []
        skipped_in_a_row = 0
        while len(batch) < self.batch_size:
            order = self._order_for(self.epoch)
            item = self.dataset.get(int(order[self.position]))
            self.position += 1
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
            if isinstance(item, Skipped):
                key = "skipped_long_prompts" if item is Skipped.TOO_LONG else "skipped_bad_rows"
                self._counts[key] += 1
                skipped_in_a_row += 1
                if skipped_in_a_row >= len(self.dataset):
                    raise DataError(
                        f"data.paths {self.dataset.config.paths}: every usable row was skipped in a full pass "
                        f"(data.max_prompt_tokens={self.dataset.config.max_prompt_tokens}); raise the limit"
                    )
                continue
            skipped_in_a_row = 0
            batch.append(item)
        self._counts["prompts"] += len(batch)
        return batch

    @property
    def counters(self) -> dict[str, int]:
        """Metrics: epoch, prompts yielded, long prompts skipped, bad rows skipped (load + render)."""
        counts = dict(self._counts)
        counts["skipped_bad_rows"] += self.dataset.bad_rows
        return {"epoch": self.epoch, **counts}

    def state_dict(self) -> dict[str, Any]:
        """-> everything needed to resume exactly here (plain ints, JSON-safe)."""
        cfg = self.dataset.config
        return {
            "epoch": self.epoch,
            "index": self.position,
            "num_rows": len(self.dataset),
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "counters": dict(self._counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; DataError if the dataset or its order changed since."""
        cfg = self.dataset.config
        if state["num_rows"] != len(self.dataset):
            raise DataError(
                f"cannot resume the data position: the checkpoint saw {state['num_rows']} usable rows, "
                f"data.paths {cfg.paths} now has {len(self.dataset)}"
            )
        if (state["seed"], state["shuffle"]) != (cfg.seed, cfg.shuffle):
            raise DataError(
                f"cannot resume the data position: the checkpoint used data.seed={state['seed']}, "
                f"data.shuffle={state['shuffle']}; the config has {cfg.seed}, {cfg.shuffle}"
            )
        if not 0 <= state["index"] < len(self.dataset):
            raise DataError(f"cannot resume the data position: index {state['index']} is out of range")
        self.epoch, self.position = int(state["epoch"]), int(state["index"])
        self._counts = {k: int(state["counters"].get(k, 0)) for k in self._counts}


def shard_batch(batch: Sequence[T], dp_rank: int, dp_size: int) -> list[T]:
    """A step's prompts (identical on every rank), (dp_rank, dp_size) -> this rank's contiguous share.

    Whole prompts only, so a group never straddles ranks (specs/algorithms.md).
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"shard_batch: dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
    if len(batch) % dp_size:
        raise ValueError(
            f"shard_batch: {len(batch)} prompts per step do not divide over {dp_size} data-parallel ranks; "
            "make the prompts per step a multiple of the DP size"
        )
    share = len(batch) // dp_size
    return list(batch[dp_rank * share : (dp_rank + 1) * share])
