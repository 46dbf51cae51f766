"""Files -> validated rows: load each file with `datasets`, check every row's mapped fields.

Each file stays its own `datasets.Dataset` (no concatenation), so files may differ in schema and
every row keeps its provenance: an error says "train.jsonl row 7 (line 9)", not "row 1207".
Validation is eager and cheap (no tokenisation), so a bad row stops the run before any
process group or rollout engine starts.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from pipeline.data.config import DataConfig, DataError

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
_SKIP_HINT = "fix the row, or set data.on_bad_row: skip to skip and count such rows"


class BadRow(Exception):
    """One row's mapped field is missing, has the wrong type, or is empty."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field {field!r} {reason}")
        self.field = field


@dataclass
class Fields:
    """A row's mapped fields, normalised: prompt (text or chat), answer string, extras."""

    text: str | None
    messages: list[dict[str, str]] | None
    answer: str | None
    extra: dict[str, Any]


@dataclass
class Source:
    """One loaded file or dataset directory; `offset` is the global index of its first row."""

    path: str
    dataset: Any
    offset: int

    def where(self, local: int) -> str:
        """Row index within this source -> "path row N" (1-based), with the line for .jsonl files."""
        place = f"{self.path} row {local + 1}"
        if self.path.endswith(".jsonl"):
            line = _jsonl_line(self.path, local)
            if line is not None:
                place += f" (line {line})"
        return place


def _jsonl_line(path: str, row: int) -> int | None:
    """0-based row of a .jsonl file -> its 1-based line number (`datasets` skips blank lines)."""
    seen = -1
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return number
    return None


def _lookup(row: dict[str, Any], path: str) -> Any:
    """Row dict, dotted field path -> the value; BadRow if any step is missing or None."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            raise BadRow(path, "is missing")
        value = value[part]
    return value


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadRow(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(field, "is empty")
    return value


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise BadRow(field, f"must be a list of {{'role', 'content'}} messages, got {type(value).__name__}")
    if not value:
        raise BadRow(field, "is an empty chat")
    chat = []
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRow(field, f"message {k} must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise BadRow(field, f"message {k} has no 'role' string")
        if content is None:
            raise BadRow(field, f"message {k} has no 'content' string")
        if not isinstance(content, str):
            raise BadRow(field, f"message {k} 'content' must be a string, got {type(content).__name__}")
        chat.append({"role": role, "content": content})
    return chat


def _answer(value: Any, field: str) -> str:
    # Numeric answers (GSM8K-style) are common in JSON; they become their decimal string.
    if isinstance(value, bool):
        raise BadRow(field, "must be a string or a number, got bool")
    if isinstance(value, (int, float, np.integer, np.floating)):
        if not math.isfinite(value):
            raise BadRow(field, f"is not a finite number ({value})")
        return str(value)
    return _text(value, field)


def row_fields(row: dict[str, Any], config: DataConfig) -> Fields:
    """A raw row -> its normalised `Fields`; BadRow naming the field when it does not conform."""
    if config.messages_field is not None:
        text, messages = None, _messages(_lookup(row, config.messages_field), config.messages_field)
    else:
        text, messages = _text(_lookup(row, config.prompt_field), config.prompt_field), None
    answer = None
    if config.answer_field is not None:
        answer = _answer(_lookup(row, config.answer_field), config.answer_field)
    extra = {}
    for name in config.extra_fields:
        try:
            extra[name] = _lookup(row, name)
        except BadRow:
            extra[name] = None
    return Fields(text, messages, answer, extra)


def _expand(paths: list[str]) -> list[str]:
    """Configured paths and globs -> existing files/directories, in the order given."""
    out = []
    for path in paths:
        if any(ch in path for ch in "*?["):
            matches = sorted(glob.glob(path))
            if not matches:
                raise DataError(f"data.paths: the pattern {path!r} matches no file")
            out.extend(matches)
        elif os.path.exists(path):
            out.append(path)
        else:
            raise DataError(f"data.paths: {path!r} does not exist")
    return out


def _first_bad_json_line(path: str) -> str:
    """A .jsonl file `datasets` could not parse -> "line N: <reason>" for its first bad line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number}: {exc.msg}"
            if not isinstance(value, dict):
                return f"line {number}: a row must be a JSON object, got {type(value).__name__}"
    return "the file is not JSON Lines"


def _load(path: str, config: DataConfig):
    """One path -> a `datasets.Dataset`; DataError naming the path if it cannot be read."""
    import datasets

    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as exc:  # noqa: BLE001 - any failure here means "not a saved dataset"
            raise DataError(f"data.paths: {path} is not a directory written by save_to_disk ({exc})") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if config.split not in loaded:
                raise DataError(f"data.split={config.split!r}: {path} has splits {sorted(loaded)}")
            loaded = loaded[config.split]
        return loaded
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise DataError(f"data.paths: {path} has extension {ext!r}; use one of {sorted(_BUILDERS)} or a dataset directory")
    try:
        return datasets.load_dataset(
            _BUILDERS[ext], data_files=os.path.abspath(path), split="train", cache_dir=config.cache_dir
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with the file and line that caused it
        detail = _first_bad_json_line(path) if _BUILDERS[ext] == "json" else str(exc)
        raise DataError(f"{path}: cannot be read as {ext[1:]} ({detail})") from exc


def _root_columns(config: DataConfig) -> list[str]:
    fields = [config.messages_field if config.messages_field is not None else config.prompt_field]
    if config.answer_field is not None:
        fields.append(config.answer_field)
    fields.extend(config.extra_fields)
    return list(dict.fromkeys(f.split(".")[0] for f in fields))


def _rows(dataset, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    for batch in dataset.iter(batch_size=batch_size):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            yield dict(zip(names, values))


class RowTable:
    """All configured files, validated: `good` holds the global indices of the usable rows.

    Global index = a source's offset + the row's index in it; it is the stable identity of a
    prompt (records carry it as `index`). `bad_rows` counts rows skipped under on_bad_row: skip.
    """

    def __init__(self, config: DataConfig):
        config.validate()
        self.config = config
        self.sources: list[Source] = []
        good: list[np.ndarray] = []
        self.bad_rows = 0
        offset = 0
        for path in _expand(config.paths):
            dataset = _load(path, config)
            missing = [c for c in _root_columns(config) if c not in dataset.column_names]
            if missing:
                raise DataError(
                    f"{path}: no column {missing[0]!r} (columns: {dataset.column_names}); "
                    "set data.prompt_field / data.messages_field / data.answer_field / data.extra_fields to match"
                )
            source = Source(path, dataset.select_columns(_root_columns(config)), offset)
            self.sources.append(source)
            good.append(offset + self._validate(source))
            offset += len(dataset)
        self.num_rows = offset
        self._offsets = [s.offset for s in self.sources]
        self.good = np.concatenate(good) if good else np.zeros(0, dtype=np.int64)

    def _validate(self, source: Source) -> np.ndarray:
        """-> local indices of the rows of `source` that pass `row_fields`."""
        ok = []
        for local, row in enumerate(_rows(source.dataset)):
            try:
                row_fields(row, self.config)
            except BadRow as exc:
                self.reject(source, local, exc)
                continue
            ok.append(local)
        return np.asarray(ok, dtype=np.int64)

    def reject(self, source: Source, local: int, exc: Exception) -> None:
        """Raise DataError for a bad row, or count it (and log the first) under on_bad_row: skip."""
        if self.config.on_bad_row == "error":
            raise DataError(f"{source.where(local)}: {exc} ({_SKIP_HINT})") from exc
        if self.bad_rows == 0:
            logger.warning("skipping bad rows (data.on_bad_row: skip); the first: %s: %s", source.where(local), exc)
        self.bad_rows += 1

    def locate(self, index: int) -> tuple[Source, int]:
        """Global row index -> (its source, local index)."""
        k = bisect.bisect_right(self._offsets, index) - 1
        return self.sources[k], index - self.sources[k].offset

    def row(self, index: int) -> dict[str, Any]:
        """Global row index -> the raw row (mapped columns only)."""
        source, local = self.locate(index)
        return source.dataset[local]
