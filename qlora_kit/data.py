"""Training data: rows -> chat messages -> token ids with masked labels -> packed rows.

Its length: the four row formats, the chat template, label masking and packing are one data path
with shared file/row error reporting.

A recipe's ``data`` section names files (or hub datasets) in one of four formats:

- ``messages``: a list of ``{"role", "content"}`` chat messages per row;
- ``prompt_completion``: ``prompt`` and ``completion``, each a string or a list of chat messages;
- ``alpaca``: ``instruction``, optional ``input``, and ``output``;
- ``text``: plain ``text``, trained on every token, without a chat template;
- ``preference``: TRL's ``prompt``/``chosen``/``rejected`` pairs. DPO and ORPO read them as
  pairs (:mod:`qlora_kit.preference_data`); here, for SFT, calibration and evaluation, a pair is
  its prompt followed by the chosen answer.

Every chat row is rendered with the tokenizer's chat template. With ``train_on_prompt``
false the loss sees only the assistant responses, each with the end-of-turn token that
closes it, so the model learns to stop. Packing puts several examples in one row whose
``position_ids`` restart at 0 for each example: transformers (sdpa and eager attention)
turns such rows into a block-diagonal causal mask, as long as no attention_mask and no KV
cache are passed, so packed examples never see each other.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.nn.utils.rnn import pad_sequence
from trl.data_utils import pack_dataset

from qlora_kit.errors import MissingFileError, UserInputError
from qlora_kit.model.logprobs import find_labelled_positions

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
# The columns each format needs, in the order that auto-detection tries them.
_REQUIRED_COLUMNS = {
    "messages": {"messages"},
    "prompt_completion": {"prompt", "completion"},
    "alpaca": {"instruction", "output"},
    "text": {"text"},
    "preference": {"chosen", "rejected"},
}
FORMATS = tuple(_REQUIRED_COLUMNS)
ROLES = ("system", "user", "assistant")
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_ACCEPTED_COLUMNS = (
    "'messages' (messages); 'prompt' + 'completion' (prompt_completion); "
    "'instruction' + 'output', optional 'input' (alpaca); 'text' (text); "
    "'chosen' + 'rejected', optional 'prompt' (preference)"
)


class DataError(UserInputError):
    """A data file or one of its rows does not fit the expected format."""


def load_rows(source: str, split: str = "train") -> datasets.Dataset:
    """Load the raw rows of a local file (by extension), a local folder, or a hub dataset.

    Raises MissingFileError (a FileNotFoundError) for a missing local file and DataError
    naming the file when it cannot be read (with the line number when it is not valid JSON).
    Every string of a local JSON file stays the text it was (see :func:`_as_written`).
    """
    path = Path(source)
    if path.suffix.lower() in _BUILDERS and path.is_dir():
        raise DataError(f"{source} is a folder, not a {path.suffix} file")
    if path.suffix.lower() in _BUILDERS and not path.is_file():
        raise MissingFileError(f"data file not found: {source} (looked for {path.absolute()})")
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{source}: unsupported file type; use one of {', '.join(_BUILDERS)}")
        if _is_blank(path):
            raise DataError(f"{source}: the file is empty")
        try:
            rows = datasets.load_dataset(builder, data_files=str(path), split="train", **_csv_options(path))
        except Exception as e:  # datasets wraps parser errors several layers deep
            bad_line = _json_error_line(path) if builder == "json" else None
            raise DataError(f"{source}: {bad_line or f'cannot read {builder} file: {_root_cause(e)}'}") from e
        return _as_written(rows, path) if builder == "json" else rows
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:
        raise DataError(f"cannot load dataset {source!r} (split {split!r}): {_root_cause(e)}") from e


def _as_written(rows: datasets.Dataset, path: Path) -> datasets.Dataset:
    """``rows`` of a JSON file, read again with Python's json when pyarrow typed a column as timestamps.

    pyarrow's JSON reader types a column whose every value looks like an ISO date (answers such
    as "2038-04-01") as timestamps, which would reach the chat template as datetimes.
    """
    if not _has_timestamps(rows.features):
        return rows
    text = path.read_text(encoding="utf-8")
    values = (
        json.loads(text) if path.suffix.lower() == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    )
    return datasets.Dataset.from_list(values)


def _has_timestamps(feature: Any) -> bool:
    if isinstance(feature, dict):
        return any(_has_timestamps(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_has_timestamps(f) for f in feature)
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return _has_timestamps(inner)
    return isinstance(feature, datasets.Value) and feature.dtype.startswith(("timestamp", "date"))


def _is_blank(path: Path, peek: int = 1 << 16) -> bool:
    """Whether a file holds nothing but whitespace (checked for files up to ``peek`` bytes)."""
    size = path.stat().st_size
    return size == 0 or (size <= peek and not path.read_bytes().strip())


def _csv_options(path: Path) -> dict[str, Any]:
    """Read every CSV column as text, so that answers like "42" or "NA" stay strings."""
    if path.suffix.lower() != ".csv":
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False}


def _json_error_line(path: Path) -> str | None:
    """Locate the first JSON syntax error of a .json or .jsonl file as 'line N: ...'."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)  # a whole-file JSON document (.json, or a one-line .jsonl)
        return None
    except json.JSONDecodeError as e:
        if path.suffix.lower() == ".json":
            return f"line {e.lineno}: invalid JSON ({e.msg})"
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number}: invalid JSON ({e.msg})"
    return None


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def detect_format(columns: Sequence[str]) -> str:
    """Name the first format (in the order of FORMATS) whose columns a dataset has."""
    for fmt, needed in _REQUIRED_COLUMNS.items():
        if needed <= set(columns):
            return fmt
    raise DataError(f"columns {sorted(columns)} fit no known format; expected {_ACCEPTED_COLUMNS}")


def _check_columns(columns: Sequence[str], fmt: str) -> None:
    """Fail early, once per file, when a format named in the recipe lacks its columns."""
    if fmt not in _REQUIRED_COLUMNS:
        raise DataError(f"unknown data format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    missing = _REQUIRED_COLUMNS[fmt] - set(columns)
    if missing:
        raise DataError(f"format {fmt!r} needs columns {sorted(missing)}, found {sorted(columns)}")


def to_messages(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> list[dict[str, str]] | str:
    """Convert one row to chat messages (the text itself for the ``text`` format).

    ``system_prompt`` is put first unless the row has its own system message (the text
    format has no messages and ignores it).
    Raises DataError saying what is wrong with the row.
    """
    if fmt == "text":
        return _string(row, "text")
    if fmt == "messages":
        messages = _message_list(row.get("messages"), "messages")
    elif fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt-completion
            answer = _message_list(completion, "completion")
            if not any(m["role"] == "assistant" for m in answer):
                raise DataError("'completion' has no assistant message")
            messages = _message_list(prompt, "prompt") + answer
        else:
            messages = [
                {"role": "user", "content": _string(row, "prompt")},
                {"role": "assistant", "content": _string(row, "completion")},
            ]
    elif fmt == "alpaca":
        instruction, extra = _string(row, "instruction"), row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"'input' must be a string, got {type(extra).__name__}")
        # Alpaca's own prompt puts the input below the instruction; an empty input means none.
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _string(row, "output")}]
    elif fmt == "preference":
        from qlora_kit.preference_data import pair_messages  # it builds on this module

        prompt, chosen, _ = pair_messages(row)
        messages = prompt + chosen
    else:
        raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")

    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant message")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _string(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        raise DataError(f"missing {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"empty {key!r}")
    return value


def _message_list(value: Any, key: str) -> list[dict[str, str]]:
    """Validate a list of chat messages; keep only role and content."""
    if value is None:
        raise DataError(f"missing {key!r}")
    if isinstance(value, str):
        # CSV cells can only hold strings: accept a JSON-encoded message list there.
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{key!r} must be a list of messages, got a string that is not JSON") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{key!r} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{key!r} message {i} must have 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{key!r} message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{key!r} message {i} content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{key!r} message {i}: empty assistant response")
        messages.append({"role": role, "content": content})
    return messages


def tokenize_example(
    example: list[dict[str, str]] | str,
    tokenizer: Any,
    max_seq_len: int,
    train_on_prompt: bool = False,
) -> dict[str, list[int]]:
    """Token ids and labels of one example, cut to ``max_seq_len`` tokens.

    Chat messages go through the tokenizer's chat template; with ``train_on_prompt`` false
    every token outside the assistant responses is labelled -100. A plain string gets the
    tokenizer's special tokens plus EOS, and is trained on every token.
    """
    if isinstance(example, str):
        input_ids = tokenizer(example)["input_ids"]
        if input_ids[-1:] != [tokenizer.eos_token_id]:
            input_ids = [*input_ids, tokenizer.eos_token_id]
        labels = list(input_ids)
    else:
        text = tokenizer.apply_chat_template(example, tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = encoded["input_ids"]
        if train_on_prompt:
            labels = list(input_ids)
        else:
            spans = _response_spans(example, tokenizer, text)
            labels = [
                token if any(start < span_end and span_start < end for span_start, span_end in spans) else IGNORE_INDEX
                for token, (start, end) in zip(input_ids, encoded["offset_mapping"])
            ]
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}


def _response_spans(messages: list[dict[str, str]], tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant responses in ``text``, the rendered conversation.

    A response starts where the template's generation prompt for it ends, and runs to the
    end of that message's rendering, cut right after its end-of-turn (EOS) token so that
    template whitespace after it (e.g. SmolLM2's newline) stays out of the loss.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(
                "the tokenizer's chat template renders a conversation differently from its prefixes, "
                "so the assistant turns cannot be located; use train_on_prompt=true or another template"
            )
        eos = tokenizer.eos_token
        eos_at = text.rfind(eos, len(before), len(through)) if eos else -1
        spans.append((len(before), eos_at + len(eos) if eos_at >= 0 else len(through)))
    return spans


def pack(dataset: datasets.Dataset, max_seq_len: int) -> datasets.Dataset:
    """Pack tokenized examples into rows of at most ``max_seq_len`` tokens.

    TRL's best-fit-decreasing packing keeps each example whole; ``position_ids`` restart at 0
    for each example, which is how the model tells packed examples apart.
    """
    packed = pack_dataset(dataset.select_columns(["input_ids", "labels"]), max_seq_len, strategy="bfd")

    def add_positions(row: dict[str, list[int]]) -> dict[str, list[int]]:
        positions = [p for length in row["seq_lengths"] for p in range(length)]
        # An example's first token has no previous token of its own to be predicted from;
        # unmasked, the loss would train the end of one example to predict the next one.
        labels = [IGNORE_INDEX if p == 0 else label for p, label in zip(positions, row["labels"])]
        return {"labels": labels, "position_ids": positions}

    return packed.map(add_positions, remove_columns=["seq_lengths"])


@dataclass
class SFTData:
    """What training and evaluation need from the data section.

    train/validation rows hold ``input_ids`` and ``labels`` (and ``position_ids`` when
    packed); test holds ``{"messages": prompt messages, "answer": reference string}``.
    skipped counts the bad rows left out (on_bad_row=skip) over all files.
    """

    train: datasets.Dataset
    validation: datasets.Dataset | None
    test: list[dict[str, Any]] | None
    skipped: int


def build_datasets(data_cfg: Any, tokenizer: Any, seed: int) -> SFTData:
    """Load, convert, tokenize, split and pack the data named by a recipe's ``data`` section."""
    if data_cfg.validation and data_cfg.validation_split:
        raise DataError("data.validation and data.validation_split are both set; use one")
    train, skipped = _tokenized(data_cfg.train, data_cfg, tokenizer)
    validation = None
    if data_cfg.validation:
        validation, more = _tokenized(data_cfg.validation, data_cfg, tokenizer)
        skipped += more
    elif data_cfg.validation_split:
        try:
            parts = train.train_test_split(test_size=data_cfg.validation_split, seed=seed)
        except ValueError as e:  # too few examples to split
            raise DataError(f"{data_cfg.train}: data.validation_split={data_cfg.validation_split}: {e}") from None
        train, validation = parts["train"], parts["test"]
    if data_cfg.packing:
        train = pack(train, data_cfg.max_seq_len)
        validation = pack(validation, data_cfg.max_seq_len) if validation is not None else None
    test = None
    if data_cfg.test:
        test, more = test_examples(data_cfg.test, data_cfg)
        require_chat_template(tokenizer, data_cfg.test)  # test prompts are rendered through it
        skipped += more
    return SFTData(train=train, validation=validation, test=test, skipped=skipped)


def _converted(source: str, data_cfg: Any) -> tuple[list[list[dict[str, str]] | str], int]:
    """Rows of a source as messages (or text), with bad rows raised or skipped and counted."""
    rows = load_rows(source, data_cfg.split)
    fmt = data_cfg.format
    try:
        fmt = detect_format(rows.column_names) if fmt == "auto" else fmt
        _check_columns(rows.column_names, fmt)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    examples, first_error, skipped = [], None, 0
    for number, row in enumerate(rows, start=1):
        try:
            examples.append(to_messages(row, fmt, data_cfg.system_prompt))
        except DataError as e:
            problem = f"row {number}: {e}"
            if data_cfg.on_bad_row != "skip":
                raise DataError(f"{source}: {problem}") from None
            first_error, skipped = first_error or problem, skipped + 1
    if skipped:
        logger.warning("skipped %d of %d rows in %s (first: %s)", skipped, len(rows), source, first_error)
    if not examples:
        raise DataError(f"{source}: no usable rows")
    return examples, skipped


def require_chat_template(tokenizer: Any, source: str) -> None:
    """Raise DataError when chat rows from ``source`` meet a tokenizer that has no chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{source}: the rows are chat messages, but the model's tokenizer has no chat template; "
            "use a chat (instruct) model, or plain text rows (data.format: text)"
        )


def _tokenized(source: str, data_cfg: Any, tokenizer: Any) -> tuple[datasets.Dataset, int]:
    examples, skipped = _converted(source, data_cfg)
    if not isinstance(examples[0], str):
        require_chat_template(tokenizer, source)
    rows = [tokenize_example(e, tokenizer, data_cfg.max_seq_len, data_cfg.train_on_prompt) for e in examples]
    # Truncation can cut a response away entirely; such a row has nothing to learn from.
    kept = [row for row in rows if any(label != IGNORE_INDEX for label in row["labels"])]
    if len(kept) < len(rows):
        logger.warning(
            "%s: dropped %d of %d examples whose response lies beyond max_seq_len=%d",
            source,
            len(rows) - len(kept),
            len(rows),
            data_cfg.max_seq_len,
        )
    if not kept:
        raise DataError(f"{source}: no example has a response within max_seq_len={data_cfg.max_seq_len}")
    return datasets.Dataset.from_list(kept), skipped


def test_examples(source: str, data_cfg: Any) -> tuple[list[dict[str, Any]], int]:
    """Test rows as prompt messages plus the reference answer (the final assistant message)."""
    examples, skipped = _converted(source, data_cfg)
    test = []
    for number, messages in enumerate(examples, start=1):
        if isinstance(messages, str):
            raise DataError(f"{source}: a test set needs prompts and answers; the text format has none")
        if messages[-1]["role"] != "assistant":
            # Converted rows always hold an assistant turn; it is only not the last one here.
            raise DataError(f"{source}: row {number}: the last message must be the assistant's answer")
        test.append({"messages": messages[:-1], "answer": messages[-1]["content"]})
    return test, skipped


class DataCollator:
    """Pads a list of tokenized rows into a batch of tensors (right padding).

    input_ids are padded with the pad token (EOS when the tokenizer has none), labels with
    -100. Unpacked rows get no attention mask: causal attention never lets a token see the pads
    after it, and the pads' labels are -100, so the loss and its gradients are those of the rows
    alone; without a mask transformers takes the causal kernel without first reading the mask on
    the GPU (a host sync per step). Packed rows keep their position_ids instead, and the batch
    carries ``use_cache=False``: with a KV cache (the model default outside gradient
    checkpointing) transformers does not build the per-example mask from them.
    ``labelled_positions`` are the positions the loss reads, found here on the CPU for the same reason.
    """

    def __init__(self, tokenizer: Any) -> None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise DataError("the model's tokenizer has neither a pad token nor an EOS token to pad with")
        self.pad_token_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        def padded(key: str, value: int) -> torch.Tensor:
            return pad_sequence([torch.tensor(row[key]) for row in rows], batch_first=True, padding_value=value)

        batch: dict[str, Any] = {
            "input_ids": padded("input_ids", self.pad_token_id),
            "labels": padded("labels", IGNORE_INDEX),
        }
        if "position_ids" in rows[0]:
            # Padding positions are 0: each pad token is then an example of its own, seen by no one.
            batch["position_ids"] = padded("position_ids", 0)
            batch["use_cache"] = False
        batch["labelled_positions"] = find_labelled_positions(batch["labels"])
        return batch


def exact_match(prediction: str, answer: str) -> bool:
    """Whether a generated answer equals the reference.

    Normalisation: leading and trailing whitespace is stripped from both; nothing else
    (case, inner spaces and punctuation all count).
    """
    return prediction.strip() == answer.strip()
