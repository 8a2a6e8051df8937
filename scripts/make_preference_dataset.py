"""Generate the DPO quickstart's pairs: for each date-iso prompt, the ISO 8601 answer over a near miss.

    python scripts/make_preference_dataset.py      # reads examples/date-iso, writes examples/date-iso-pref/*.jsonl

Each training row of examples/date-iso, and each of its first 100 validation rows, becomes one pair in TRL's conversational
preference format: the same user prompt, ``chosen`` the reference answer (YYYY-MM-DD, nothing
else) and ``rejected`` one near miss, drawn with the seed from the ways the untuned model
misses (measured with ``make_task_dataset.py --measure-base``):

- ``echo``: the date as the prompt wrote it ("12 May 2079");
- ``year``: the right month and day under a year near the model's training data ("2022-05-12");
- ``chatty``: the right date in a sentence ("The date in ISO 8601 format is 2079-05-12.");
- ``format``: the right date in another layout ("05/12/2079", "2079/05/12", "2079-5-12", "12.05.2079");
- ``swap``: day and month exchanged, or one day off where that is the same date ("2079-12-05").

The preference is checkable: the chosen answer is exactly the reference, and no rejected answer
matches it (checked while writing). The test split stays examples/date-iso/test.jsonl, whose
dates appear in no pair. The output is the same for the same seed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

KINDS = ("echo", "year", "chatty", "format", "swap")
ROOT = Path(__file__).resolve().parents[1]


def near_miss(date: dt.date, written: str, kind: str, rng: random.Random) -> str:
    """A wrong answer of the given kind for ``date``, written in the prompt as ``written``."""
    if kind == "echo":
        return written
    if kind == "year":
        year = rng.choice([y for y in range(2019, 2025) if y != date.year])
        return f"{year:04d}-{date.month:02d}-{date.day:02d}"
    if kind == "chatty":
        return rng.choice(
            (
                f"The date in ISO 8601 format is {date.isoformat()}.",
                f"{date.isoformat()}\n\nThis date is in ISO 8601 format (YYYY-MM-DD).",
                f"Sure! {date.isoformat()}",
            )
        )
    if kind == "format":
        layouts = (
            f"{date.month:02d}/{date.day:02d}/{date.year}",
            f"{date.year}/{date.month:02d}/{date.day:02d}",
            f"{date.year}-{date.month}-{date.day}",  # unpadded: the ISO date itself from the 10th of October on
            f"{date.day:02d}.{date.month:02d}.{date.year}",
        )
        return rng.choice([layout for layout in layouts if layout != date.isoformat()])
    if date.day <= 12 and date.day != date.month:
        return f"{date.year:04d}-{date.day:02d}-{date.month:02d}"
    return (date + dt.timedelta(days=rng.choice((-1, 1)))).isoformat()


def pairs(rows: list[dict], rng: random.Random) -> list[dict]:
    """One pair per date-iso row: its prompt, its answer (chosen) and a near miss (rejected)."""
    out = []
    for row in rows:
        user, answer = row["messages"][0], row["messages"][-1]["content"]
        date = dt.date.fromisoformat(answer)
        rejected = near_miss(date, user["content"].splitlines()[-1], rng.choice(KINDS), rng)
        if rejected.strip() == answer:  # the pair would not be checkable
            raise AssertionError(f"near miss equals the answer for {answer}")
        out.append(
            {
                "prompt": [user],
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=Path, default=ROOT / "examples" / "date-iso")
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "date-iso-pref")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--valid", type=int, default=100, help="pairs from the first N validation rows")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        rows = [json.loads(line) for line in (args.task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        rows = rows[: args.valid] if split == "valid" else rows
        with (args.out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for pair in pairs(rows, rng):
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} pairs to {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
