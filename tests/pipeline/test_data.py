"""Prompt data: loading (jsonl, parquet, arrow, save_to_disk), field mapping, chat template,
deterministic resumable order, long-prompt skipping, bad-row errors and skip mode, DP sharding.

Datasets are written to tmp dirs and the tokenizer is a character-level one built here.
"""

from __future__ import annotations

import json
import string

import datasets
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pipeline.data import DataConfig, DataError, PromptDataset, PromptLoader, Skipped, shard_batch

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}"
    "{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


ROWS = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i), "level": i % 3} for i in range(10)]


def write_jsonl(path, rows, blank_lines_before=()):
    with open(path, "w") as f:
        for k, row in enumerate(rows):
            if k in blank_lines_before:
                f.write("\n")
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def config(tmp_path, paths, **overrides) -> DataConfig:
    return DataConfig(paths=list(paths), cache_dir=str(tmp_path / "hf_cache"), **overrides)


def drain(loader: PromptLoader, steps: int) -> list[list[int]]:
    return [[r.index for r in next(loader)] for _ in range(steps)]


# --- loading and field mapping -------------------------------------------------------------


def test_jsonl_text_prompt_gets_chat_template_and_generation_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS[:3])
    dataset = PromptDataset(config(tmp_path, [path], shuffle=False), tokenizer)
    record = dataset.get(1)
    assert record.prompt_text == "user: What is 1+1?\nassistant:"
    assert record.prompt_ids == tokenizer(record.prompt_text, add_special_tokens=False)["input_ids"]
    assert record.prompt_ids[0] != tokenizer.bos_token_id
    assert (record.answer, record.index, record.extra) == ("2", 1, {})


def test_parquet_arrow_and_save_to_disk_give_the_same_records(tmp_path, tokenizer):
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    jsonl = write_jsonl(tmp_path / "train.jsonl", ROWS)

    def texts(path, **kw):
        dataset = PromptDataset(config(tmp_path, [path], **kw), tokenizer)
        return [(r.prompt_text, r.answer, r.index) for r in dataset.records()]

    expected = texts(jsonl)
    assert len(expected) == 10
    assert texts(str(tmp_path / "train.parquet")) == expected
    assert texts(str(arrow)) == expected
    assert texts(str(tmp_path / "saved")) == expected
    assert texts(str(tmp_path / "dict"), split="train") == expected
    assert len(texts(str(tmp_path / "dict"), split="test")) == 2


def test_several_files_and_globs_number_rows_globally(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a-0.jsonl", ROWS[:4])
    write_jsonl(tmp_path / "a-1.jsonl", ROWS[4:])
    dataset = PromptDataset(config(tmp_path, [str(tmp_path / "a-*.jsonl")]), tokenizer)
    assert [r.answer for r in dataset.records()] == [r["answer"] for r in ROWS]
    assert [r.index for r in dataset.records()] == list(range(10))


def test_messages_field_with_system_prompt(tmp_path, tokenizer):
    rows = [
        {"chat": [{"role": "user", "content": "hi"}], "answer": "1"},
        {"chat": [{"role": "system", "content": "own"}, {"role": "user", "content": "yo"}], "answer": "2"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    dataset = PromptDataset(config(tmp_path, [path], messages_field="chat", system_prompt="Be brief."), tokenizer)
    assert [r.prompt_text for r in dataset.records()] == [
        "system: Be brief.\nuser: hi\nassistant:",
        "system: own\nuser: yo\nassistant:",
    ]


def test_raw_prompt_with_template_keeps_latex_braces_and_adds_bos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS[:1])
    cfg = config(tmp_path, [path], apply_chat_template=False, prompt_template="{prompt} Answer in \\boxed{}.")
    record = PromptDataset(cfg, tokenizer).get(0)
    assert record.prompt_text == "What is 0+0? Answer in \\boxed{}."
    assert record.prompt_ids[0] == tokenizer.bos_token_id
    assert len(record.prompt_ids) == 1 + len(record.prompt_text)


def test_nested_numeric_answer_and_extra_fields(tmp_path, tokenizer):
    rows = [{"question": "q?", "reward_model": {"ground_truth": 42}, "meta": {"level": 3}, "src": "x"}]
    path = write_jsonl(tmp_path / "verl.jsonl", rows)
    cfg = config(
        tmp_path, [path], prompt_field="question", answer_field="reward_model.ground_truth",
        extra_fields=["meta.level", "src"],
    )
    record = PromptDataset(cfg, tokenizer).get(0)
    assert record.answer == "42"
    assert record.extra == {"meta.level": 3, "src": "x"}


def test_tokenizer_without_chat_template_is_a_clear_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS[:1])
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(DataError, match="apply_chat_template: false"):
        PromptDataset(config(tmp_path, [path]), bare)


# --- order and resume ----------------------------------------------------------------------


def test_shuffle_is_deterministic_per_seed_and_new_each_epoch(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    dataset = PromptDataset(config(tmp_path, [path], seed=7), tokenizer)
    first = drain(PromptLoader(dataset, 5), 4)
    assert first == drain(PromptLoader(dataset, 5), 4)
    epoch0, epoch1 = first[0] + first[1], first[2] + first[3]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1 and epoch0 != list(range(10))
    other_seed = PromptDataset(config(tmp_path, [path], seed=8), tokenizer)
    assert drain(PromptLoader(other_seed, 5), 4) != first


def test_resume_from_state_dict_sees_exactly_the_same_prompts(tmp_path, tokenizer):
    rows = ROWS + [{"prompt": "x" * 100, "answer": "1"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = config(tmp_path, [path], seed=3, max_prompt_tokens=40)
    uninterrupted = PromptLoader(PromptDataset(cfg, tokenizer), 3)
    expected = drain(uninterrupted, 9)

    first_run = PromptLoader(PromptDataset(cfg, tokenizer), 3)
    head = drain(first_run, 4)
    state = json.loads(json.dumps(first_run.state_dict()))
    resumed = PromptLoader(PromptDataset(cfg, tokenizer), 3)
    resumed.load_state_dict(state)
    assert head + drain(resumed, 5) == expected
    assert resumed.counters == uninterrupted.counters


def test_batches_fill_across_the_epoch_boundary(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    loader = PromptLoader(PromptDataset(config(tmp_path, [path], shuffle=False), tokenizer), 4)
    assert drain(loader, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert loader.counters["epoch"] == 1


def test_resume_refuses_a_changed_dataset(tmp_path, tokenizer):
    short = write_jsonl(tmp_path / "short.jsonl", ROWS[:5])
    full = write_jsonl(tmp_path / "full.jsonl", ROWS)
    state = PromptLoader(PromptDataset(config(tmp_path, [full]), tokenizer), 2).state_dict()
    loader = PromptLoader(PromptDataset(config(tmp_path, [short]), tokenizer), 2)
    with pytest.raises(DataError, match="10 usable rows"):
        loader.load_state_dict(state)


# --- skipping ------------------------------------------------------------------------------


def test_long_prompts_are_skipped_and_counted(tmp_path, tokenizer):
    rows = [{"prompt": "short", "answer": "1"}, {"prompt": "y" * 50, "answer": "2"}, {"prompt": "tiny", "answer": "3"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = config(tmp_path, [path], shuffle=False, max_prompt_tokens=len("user: short\nassistant:"))
    dataset = PromptDataset(cfg, tokenizer)
    assert dataset.get(1) is Skipped.TOO_LONG
    loader = PromptLoader(dataset, 2)
    assert drain(loader, 2) == [[0, 2], [0, 2]]
    assert loader.counters["skipped_long_prompts"] == 2  # once per epoch
    assert all(len(r.prompt_ids) <= cfg.max_prompt_tokens for r in dataset.records())


def test_every_prompt_too_long_is_an_error_not_a_hang(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS[:3])
    loader = PromptLoader(PromptDataset(config(tmp_path, [path], max_prompt_tokens=5), tokenizer), 2)
    with pytest.raises(DataError, match="max_prompt_tokens=5"):
        next(loader)


# --- bad rows ------------------------------------------------------------------------------


def test_bad_row_error_names_file_row_line_and_field(tmp_path, tokenizer):
    rows = ROWS[:2] + [{"prompt": "no answer here"}] + ROWS[3:5]
    path = write_jsonl(tmp_path / "train.jsonl", rows, blank_lines_before=(1,))
    with pytest.raises(DataError) as err:
        PromptDataset(config(tmp_path, [path]), tokenizer)
    message = str(err.value)
    assert f"{path} row 3 (line 4)" in message
    assert "field 'answer' is missing" in message
    assert "on_bad_row: skip" in message


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": ["a", "list"], "answer": "1"}, "field 'prompt' must be a string, got list"),
        ({"prompt": "   ", "answer": "1"}, "field 'prompt' is empty"),
        ({"prompt": "p", "answer": True}, "field 'answer' must be a string or a number, got bool"),
        ({"prompt": "p", "answer": ""}, "field 'answer' is empty"),
    ],
)
def test_bad_row_kinds(tmp_path, tokenizer, row, reason):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match=f"row 2.*{reason}"):
        PromptDataset(config(tmp_path, [path]), tokenizer)


def test_bad_chat_messages_name_the_message(tmp_path, tokenizer):
    rows = [{"chat": [{"role": "user", "content": "ok"}], "answer": "1"}, {"chat": [{"role": "user"}], "answer": "1"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2 \(line 2\): field 'chat' message 0 has no 'content' string"):
        PromptDataset(config(tmp_path, [path], messages_field="chat"), tokenizer)


def test_skip_mode_skips_and_counts_bad_rows(tmp_path, tokenizer):
    rows = [ROWS[0], {"prompt": "", "answer": "1"}, ROWS[1], {"prompt": "p"}, ROWS[2]]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dataset = PromptDataset(config(tmp_path, [path], on_bad_row="skip", shuffle=False), tokenizer)
    assert len(dataset) == 3 and dataset.bad_rows == 2
    loader = PromptLoader(dataset, 3)
    assert drain(loader, 1) == [[0, 2, 4]]
    assert loader.counters["skipped_bad_rows"] == 2


def test_chat_template_failure_is_a_row_error_or_skipped(tmp_path, tokenizer):
    rows = [{"chat": [{"role": "user", "content": "a"}], "answer": "1"}, {"chat": [{"role": "robot", "content": "b"}], "answer": "2"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    strict = PromptDataset(config(tmp_path, [path], messages_field="chat", shuffle=False), tokenizer)
    with pytest.raises(DataError, match=r"chat\.jsonl row 2 \(line 2\): the chat template failed.*unknown role robot"):
        strict.get(1)
    lenient = PromptDataset(config(tmp_path, [path], messages_field="chat", shuffle=False, on_bad_row="skip"), tokenizer)
    loader = PromptLoader(lenient, 2)
    assert drain(loader, 1) == [[0, 0]]
    assert loader.counters["skipped_bad_rows"] == 1


def test_unparseable_jsonl_line_is_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "broken.jsonl", [ROWS[0], ROWS[1], '{"prompt": "cut off",'])
    with pytest.raises(DataError, match=r"broken\.jsonl: cannot be read as jsonl \(line 3: "):
        PromptDataset(config(tmp_path, [path]), tokenizer)


def test_missing_column_and_missing_file_are_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    with pytest.raises(DataError, match=r"no column 'solution'"):
        PromptDataset(config(tmp_path, [path], answer_field="solution"), tokenizer)
    with pytest.raises(DataError, match=r"nope\.jsonl' does not exist"):
        PromptDataset(config(tmp_path, [str(tmp_path / "nope.jsonl")]), tokenizer)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"paths": []}, "data.paths"),
        ({"on_bad_row": "ignore"}, "data.on_bad_row"),
        ({"max_prompt_tokens": 0}, "data.max_prompt_tokens"),
        ({"messages_field": "chat", "apply_chat_template": False}, "data.messages_field"),
        ({"prompt_template": "no placeholder"}, "data.prompt_template"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    kwargs = {"paths": ["x.jsonl"], **overrides}
    with pytest.raises(DataError, match=field.replace(".", r"\.")):
        DataConfig(**kwargs).validate()


# --- data parallel -------------------------------------------------------------------------


def test_shard_batch_gives_each_rank_whole_contiguous_prompts():
    batch = list(range(8))
    shards = [shard_batch(batch, rank, 4) for rank in range(4)]
    assert shards == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="multiple of the DP size"):
        shard_batch(list(range(6)), 0, 4)
    with pytest.raises(ValueError, match="dp_rank=4"):
        shard_batch(batch, 4, 4)


def test_answers_may_mix_numbers_and_strings_across_rows(tmp_path, tokenizer):
    rows = [{"prompt": "a", "answer": 5}, {"prompt": "b", "answer": "x"}, {"prompt": "c", "answer": 0.5}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    dataset = PromptDataset(config(tmp_path, [path]), tokenizer)
    assert [r.answer for r in dataset.records()] == ["5", "x", "0.5"]
