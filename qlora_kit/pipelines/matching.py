"""The rules that decide whether a generated test answer equals the reference (``eval.match``).

- ``exact``: equal after stripping surrounding whitespace (``data.exact_match``);
- ``normalized``: equal after collapsing every run of whitespace to one space and ignoring case;
- ``json``: both parse as JSON and the parsed values are equal (object key order and the
  whitespace between tokens do not count; ``true`` is not ``1``). An answer that does not
  parse is wrong, and the reason is kept to be shown.

The recipe's list of rule names is ``config.MATCH_RULES`` (config does not import pipelines).
"""

from __future__ import annotations

import json
from typing import Any

from qlora_kit.config import MATCH_RULES
from qlora_kit.errors import UserInputError


def answers_match(rule: str, prediction: str, answer: str) -> tuple[bool, str | None]:
    """Whether ``prediction`` matches ``answer`` under ``rule``, and why ``prediction`` could not
    be read under it (None when it could)."""
    if rule == "exact":
        from qlora_kit.data import exact_match

        return exact_match(prediction, answer), None
    if rule == "normalized":
        return _normalized(prediction) == _normalized(answer), None
    if rule == "json":
        try:
            parsed = json.loads(prediction)
        except json.JSONDecodeError as e:
            return False, f"not JSON: {e}"
        return _same_json(parsed, json.loads(answer)), None
    raise ValueError(f"unknown match rule {rule!r}; expected one of {', '.join(MATCH_RULES)}")


def check_references(rule: str, examples: list[dict]) -> None:
    """Raise UserInputError naming the first test example whose reference answer ``rule`` cannot read."""
    if rule != "json":
        return
    for number, example in enumerate(examples, start=1):
        try:
            json.loads(example["answer"])
        except json.JSONDecodeError as e:
            raise UserInputError(
                f"data.test example {number}: eval.match is json but the reference answer is not JSON ({e}): "
                f"{example['answer'][:80]!r}"
            ) from None


def _normalized(text: str) -> str:
    return " ".join(text.split()).casefold()


def _same_json(a: Any, b: Any) -> bool:
    """Equality of parsed JSON that keeps its types apart (Python's ``True == 1 == 1.0``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return a == b
    return type(a) is type(b) and a == b
