"""Validated rows -> prompt records: chat template, tokenisation, the prompt-length limit.

Rendering is lazy (one row at a time, when the loader reaches it): applying a chat template
to every row of a large dataset up front would cost minutes of start-up for rows a short run
never sees. Field validation already happened eagerly in `RowTable`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.data.config import DataConfig, DataError
from pipeline.data.sources import Fields, RowTable, row_fields


@dataclass
class PromptRecord:
    """One prompt ready for the rollout engine.

    prompt_ids: token ids of the rendered prompt (chat template and generation prompt included).
    prompt_text: the rendered prompt text those ids encode.
    answer: the reference answer string, None when the data has no answer field.
    index: the row's global index over the configured files (stable across runs and resumes).
    extra: the configured `extra_fields`, by field name.
    """

    prompt_ids: list[int]
    prompt_text: str
    answer: str | None
    index: int
    extra: dict[str, Any] = field(default_factory=dict)


class Skipped(enum.Enum):
    """Why `PromptDataset.get` produced no record."""

    TOO_LONG = "too_long"
    BAD_ROW = "bad_row"


class PromptDataset:
    """The usable rows of the configured files; `get(i)` renders the i-th into a `PromptRecord`.

    `len()` counts rows that passed validation; a row may still be skipped at render time
    (too many tokens, or a chat the template rejects under on_bad_row: skip).
    """

    def __init__(self, config: DataConfig, tokenizer: Any):
        self.config = config
        self.tokenizer = tokenizer
        if config.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "data.apply_chat_template is true but the tokenizer has no chat template; "
                "set data.apply_chat_template: false to feed raw prompt text"
            )
        self.rows = RowTable(config)

    def __len__(self) -> int:
        return len(self.rows.good)

    @property
    def bad_rows(self) -> int:
        """Rows skipped at load time for a missing, mistyped or empty field."""
        return self.rows.bad_rows

    def render(self, fields: Fields) -> str:
        """A row's fields -> the prompt text the model sees."""
        cfg = self.config
        if fields.messages is None:
            text = fields.text
            if cfg.prompt_template is not None:
                text = cfg.prompt_template.replace("{prompt}", text)
            if not cfg.apply_chat_template:
                return text
            messages = [{"role": "user", "content": text}]
        else:
            messages = fields.messages
        if cfg.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def get(self, i: int) -> PromptRecord | Skipped:
        """Position among the usable rows -> its `PromptRecord`, or why it was skipped.

        Raises DataError (file, row, reason) when the chat template fails on the row and
        on_bad_row is "error".
        """
        index = int(self.rows.good[i])
        fields = row_fields(self.rows.row(index), self.config)
        try:
            text = self.render(fields)
        except Exception as exc:  # noqa: BLE001 - templates raise arbitrary errors on odd chats
            if self.config.on_bad_row == "error":
                source, local = self.rows.locate(index)
                raise DataError(
                    f"{source.where(local)}: the chat template failed on this row ({type(exc).__name__}: {exc}); "
                    "fix the row, or set data.on_bad_row: skip"
                ) from exc
            return Skipped.BAD_ROW
        # The template already wrote any BOS it wants into the text; raw text gets the
        # tokenizer's own special tokens, as the model saw in pretraining.
        ids = self.tokenizer(text, add_special_tokens=not self.config.apply_chat_template)["input_ids"]
        if len(ids) > self.config.max_prompt_tokens:
            return Skipped.TOO_LONG
        return PromptRecord(list(ids), text, fields.answer, index, fields.extra)

    def records(self) -> Iterator[PromptRecord]:
        """-> every record once, in file order, skipping what `get` skips (for evaluation sets)."""
        for i in range(len(self)):
            item = self.get(i)
            if not isinstance(item, Skipped):
                yield item
