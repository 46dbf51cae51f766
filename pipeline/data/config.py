"""The `data` section of the run config, and the error every data problem raises."""

from __future__ import annotations

from dataclasses import dataclass, field

BAD_ROW_POLICIES = ("error", "skip")


class DataError(ValueError):
    """A dataset problem a user can fix; the message names the file, the row and the field."""


@dataclass
class DataConfig:
    """Where the prompts come from and how they become token ids.

    paths: .jsonl/.json/.parquet/.arrow files, glob patterns, or directories written by
        `datasets.Dataset.save_to_disk` (a `DatasetDict` directory uses `split`).
    prompt_field: the column holding the prompt text. Ignored when `messages_field` is set.
    messages_field: the column holding a chat, a list of {"role", "content"} dicts.
    answer_field: the column holding the reference answer (str or number); None if the data has
        none (custom rewards only). Dotted paths reach into nested columns
        ("reward_model.ground_truth"); the same holds for the other field names.
    extra_fields: further columns passed through to each record (and to custom rewards).
    apply_chat_template: render prompts with the tokenizer's chat template (a text prompt becomes
        one user message) and add the generation prompt; False feeds the raw text.
    system_prompt: a system message put first when the chat has none.
    prompt_template: wraps a text prompt; "{prompt}" is replaced by it (no other braces are
        interpreted, so LaTeX is safe), e.g. "{prompt}\\nPut the final answer in \\\\boxed{}.".
    max_prompt_tokens: longer prompts are skipped and counted.
    shuffle / seed: a fresh permutation per epoch, derived from (seed, epoch) alone.
    on_bad_row: "error" stops with the file, row and field; "skip" skips the row and counts it.
    cache_dir: where `datasets` keeps its converted copies (None: its default cache).
    """

    paths: list[str] = field(default_factory=list)
    split: str = "train"
    prompt_field: str = "prompt"
    messages_field: str | None = None
    answer_field: str | None = "answer"
    extra_fields: list[str] = field(default_factory=list)
    apply_chat_template: bool = True
    system_prompt: str | None = None
    prompt_template: str | None = None
    max_prompt_tokens: int = 1024
    shuffle: bool = True
    seed: int = 0
    on_bad_row: str = "error"
    cache_dir: str | None = None

    def validate(self) -> None:
        """Raise DataError naming the first invalid field and how to fix it."""
        if not self.paths:
            raise DataError("data.paths is empty: give at least one .jsonl/.parquet/.arrow file or dataset directory")
        if isinstance(self.paths, str):
            raise DataError(f"data.paths must be a list of paths, got the string {self.paths!r}; write [{self.paths!r}]")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise DataError(f"data.on_bad_row={self.on_bad_row!r}: choose one of {BAD_ROW_POLICIES}")
        if self.max_prompt_tokens < 1:
            raise DataError(f"data.max_prompt_tokens={self.max_prompt_tokens}: must be >= 1")
        if self.messages_field is None and not self.prompt_field:
            raise DataError("data.prompt_field is empty and data.messages_field is unset: name the prompt column")
        if self.messages_field is not None and not self.apply_chat_template:
            raise DataError(
                "data.messages_field needs data.apply_chat_template: true (a chat cannot be fed as raw text)"
            )
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise DataError(f"data.prompt_template={self.prompt_template!r} has no '{{prompt}}' placeholder")
