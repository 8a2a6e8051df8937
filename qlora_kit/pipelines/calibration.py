"""Calibration data for GPTQ and AWQ: text -> token ids -> windows of ``seq_len`` tokens.

The source is a ``.txt`` file (one document), or any file or dataset that
``data.load_rows`` reads, in any of the training formats: chat rows are rendered with
the tokenizer's chat template, exactly as training saw them; ``text`` rows are used as
they are, each closed by EOS. Short texts are concatenated and the token stream is cut
into windows; rows are shuffled (seeded) first, so the windows mix many rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qlora_kit.data import DataError, detect_format, load_rows, require_chat_template, to_messages
from qlora_kit.errors import UserInputError


class CalibrationError(UserInputError):
    """Calibration data that cannot be read or is too short; the message says which and how much."""


def calibration_windows(
    tokenizer: Any,
    source: str | Path,
    n_samples: int,
    seq_len: int,
    fmt: str = "auto",
    split: str = "train",
    system_prompt: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` token ids, int64 ``[n_samples, seq_len]``.

    Raises CalibrationError when the source holds fewer than ``n_samples * seq_len``
    tokens, saying how many it has.
    """
    if n_samples <= 0 or seq_len <= 0:
        raise CalibrationError(f"calibration needs positive samples and seq_len, got {n_samples} x {seq_len}")
    needed = n_samples * seq_len
    ids: list[int] = []
    for text, is_chat in _texts(tokenizer, str(source), fmt, split, system_prompt, seed):
        if is_chat:  # the chat template already holds the special tokens
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids += tokenizer(text)["input_ids"]
            if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
                ids.append(tokenizer.eos_token_id)
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise CalibrationError(
            f"calibration data {source} has {len(ids)} tokens, but {n_samples} samples x {seq_len} tokens "
            f"need {needed}: pass a smaller --calibration-samples or --calibration-seq-len, or more data "
            "(--calibration PATH)"
        )
    return torch.tensor(ids[:needed], dtype=torch.long).view(n_samples, seq_len)


def _texts(
    tokenizer: Any, source: str, fmt: str, split: str, system_prompt: str | None, seed: int
) -> Iterator[tuple[str, bool]]:
    """(text, is_chat) for each document of the source, rows in a seeded random order."""
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise CalibrationError(f"calibration file not found: {source}")
        yield path.read_text(encoding="utf-8"), False
        return
    try:
        rows = load_rows(source, split)  # its DataError already names the file
    except FileNotFoundError as e:
        raise CalibrationError(f"calibration {e}") from None
    try:
        fmt = detect_format(rows.column_names) if fmt == "auto" else fmt
    except DataError as e:
        raise CalibrationError(f"calibration data {source}: {e}") from None
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    for index in order:
        try:
            example = to_messages(rows[index], fmt, system_prompt)
        except DataError as e:
            raise CalibrationError(f"calibration data {source}: row {index + 1}: {e}") from None
        if isinstance(example, str):
            yield example, False
        else:
            require_chat_template(tokenizer, f"calibration data {source}")
            yield tokenizer.apply_chat_template(example, tokenize=False), True
