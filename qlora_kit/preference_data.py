"""Preference pairs for DPO and ORPO: rows -> prompt, chosen and rejected messages -> token ids.

TRL's preference formats, read from the columns:

- explicit prompt: ``prompt``, ``chosen`` and ``rejected``, each a string or a list of chat
  messages (conversational). A string prompt is a user turn and a string answer an assistant
  turn, as for SFT's ``prompt_completion`` rows;
- implicit prompt: ``chosen`` and ``rejected`` only, two whole conversations; the prompt is the
  turns they share (TRL's ``extract_prompt``).

A pair is tokenized as TRL's DPOTrainer tokenizes a conversational pair: the prompt through
the tokenizer's chat template with the generation prompt, prompt + answer without it, and
the answer's tokens start where the two renderings part (TRL's ``common_prefix_length``), so
they include the template's end of turn. ``preference.max_prompt_len`` keeps a long prompt's
last tokens; ``data.max_seq_len`` then cuts the answers. Batches are TRL's
``DataCollatorForPreference`` layout: the chosen rows, then the rejected rows, with a
``completion_mask`` over the answer tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import datasets
from trl.data_utils import common_prefix_length, extract_prompt
from trl.trainer.dpo_trainer import DataCollatorForPreference

from qlora_kit.data import (
    DataError,
    _message_list,
    _string,
    load_rows,
    require_chat_template,
    test_examples,
)

logger = logging.getLogger(__name__)

PAIR_COLUMNS = {"chosen", "rejected"}


def pair_messages(row: dict[str, Any]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) chat messages of one preference row; DataError says what is wrong with it."""
    if "prompt" not in row or row["prompt"] is None:
        if not (isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list)):
            raise DataError("without a 'prompt', 'chosen' and 'rejected' must be whole conversations (message lists)")
        pair = extract_prompt(
            {"chosen": _message_list(row["chosen"], "chosen"), "rejected": _message_list(row["rejected"], "rejected")}
        )
        if not pair["prompt"]:
            raise DataError("'chosen' and 'rejected' share no turns: there is no prompt; add a 'prompt' column")
        prompt = pair["prompt"]
        answers = {"chosen": pair["chosen"], "rejected": pair["rejected"]}
    else:
        value = row["prompt"]
        prompt = _message_list(value, "prompt") if isinstance(value, list) else [_user(row)]
        answers = {key: row.get(key) for key in ("chosen", "rejected")}
    messages = []
    for key in ("chosen", "rejected"):
        value = answers[key]
        answer = _message_list(value, key) if isinstance(value, list) else [_assistant(row, key)]
        if not any(m["role"] == "assistant" for m in answer):
            raise DataError(f"{key!r} has no assistant message")
        messages.append(answer)
    if messages[0] == messages[1]:
        raise DataError("'chosen' and 'rejected' are the same answer")
    return prompt, messages[0], messages[1]


def _user(row: dict[str, Any]) -> dict[str, str]:
    return {"role": "user", "content": _string(row, "prompt")}


def _assistant(row: dict[str, Any], key: str) -> dict[str, str]:
    return {"role": "assistant", "content": _string(row, key)}


def tokenize_pair(
    prompt: list[dict],
    chosen: list[dict],
    rejected: list[dict],
    tokenizer: Any,
    max_seq_len: int,
    max_prompt_len: int | None = None,
) -> dict[str, list[int]] | None:
    """``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` of a pair (None when no answer token fits)."""

    def ids(messages: list[dict], generation_prompt: bool = False) -> list[int]:
        return tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
        )["input_ids"]

    prompt_ids, with_chosen, with_rejected = ids(prompt, True), ids(prompt + chosen), ids(prompt + rejected)
    start = min(common_prefix_length(prompt_ids, with_chosen), common_prefix_length(prompt_ids, with_rejected))
    prompt_ids, chosen_ids, rejected_ids = prompt_ids[:start], with_chosen[start:], with_rejected[start:]
    if max_prompt_len is not None:
        prompt_ids = prompt_ids[-max_prompt_len:]
    room = max_seq_len - len(prompt_ids)
    if room <= 0 or not chosen_ids or not rejected_ids:
        return None
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids[:room], "rejected_ids": rejected_ids[:room]}


@dataclass
class PreferenceData:
    """What preference training and evaluation need from the data section.

    train/validation rows hold ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``; test holds
    ``{"messages": prompt messages, "answer": reference}`` as for SFT. skipped counts the bad
    rows left out (on_bad_row=skip), dropped the pairs whose answers lie beyond max_seq_len.
    """

    train: datasets.Dataset
    validation: datasets.Dataset | None
    test: list[dict[str, Any]] | None
    skipped: int
    dropped: int


def build_preference_datasets(
    data_cfg: Any, tokenizer: Any, seed: int, max_prompt_len: int | None = None
) -> PreferenceData:
    """Load, check, tokenize and split the pairs named by a recipe's ``data`` section."""
    if data_cfg.validation and data_cfg.validation_split:
        raise DataError("data.validation and data.validation_split are both set; use one")
    if data_cfg.packing:
        raise DataError("data.packing does not apply to preference pairs: set data.packing=false")
    require_chat_template(tokenizer, data_cfg.train)
    train, skipped, dropped = _tokenized_pairs(data_cfg.train, data_cfg, tokenizer, max_prompt_len)
    validation = None
    if data_cfg.validation:
        validation, more, fewer = _tokenized_pairs(data_cfg.validation, data_cfg, tokenizer, max_prompt_len)
        skipped, dropped = skipped + more, dropped + fewer
    elif data_cfg.validation_split:
        try:
            parts = train.train_test_split(test_size=data_cfg.validation_split, seed=seed)
        except ValueError as e:  # too few pairs to split
            raise DataError(f"{data_cfg.train}: data.validation_split={data_cfg.validation_split}: {e}") from None
        train, validation = parts["train"], parts["test"]
    test = None
    if data_cfg.test:
        # The test split holds prompts and reference answers in any SFT format (or pairs: their chosen answer).
        test, more = test_examples(data_cfg.test, replace(data_cfg, format="auto"))
        skipped += more
    return PreferenceData(train=train, validation=validation, test=test, skipped=skipped, dropped=dropped)


def _tokenized_pairs(
    source: str, data_cfg: Any, tokenizer: Any, max_prompt_len: int | None
) -> tuple[datasets.Dataset, int, int]:
    rows = load_rows(source, data_cfg.split)
    missing = PAIR_COLUMNS - set(rows.column_names)
    if missing:
        raise DataError(
            f"{source}: preference pairs need columns 'chosen' and 'rejected' (and usually 'prompt'); "
            f"missing {sorted(missing)}, found {sorted(rows.column_names)}"
        )
    pairs, first_error, skipped, dropped = [], None, 0, 0
    for number, row in enumerate(rows, start=1):
        try:
            prompt, chosen, rejected = pair_messages(row)
        except DataError as e:
            problem = f"row {number}: {e}"
            if data_cfg.on_bad_row != "skip":
                raise DataError(f"{source}: {problem}") from None
            first_error, skipped = first_error or problem, skipped + 1
            continue
        if data_cfg.system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": data_cfg.system_prompt}, *prompt]
        pair = tokenize_pair(prompt, chosen, rejected, tokenizer, data_cfg.max_seq_len, max_prompt_len)
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    if skipped:
        logger.warning("skipped %d of %d rows in %s (first: %s)", skipped, len(rows), source, first_error)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d pairs whose prompt leaves no answer token within max_seq_len=%d",
            source,
            dropped,
            len(rows),
            data_cfg.max_seq_len,
        )
    if not pairs:
        raise DataError(f"{source}: no usable preference pairs")
    return datasets.Dataset.from_list(pairs), skipped, dropped


def preference_collator(tokenizer: Any) -> DataCollatorForPreference:
    """TRL's preference collator: chosen rows then rejected rows, right-padded, with ``completion_mask``."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("the model's tokenizer has neither a pad token nor an EOS token to pad with")
    return DataCollatorForPreference(pad_token_id=pad_id)
