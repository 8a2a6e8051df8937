"""QAT evidence: merge adapters trained with and without QAT, export int4, compare.

For each adapter directory, runs ``qlora-kit merge`` three times — merged bf16
(``--quantize none``), RTN and GPTQ on the int grid the QAT recipe trained toward — and
prints, for every export, the loss on the recipe's validation split (the task's held-out
loss), the perplexity on held-out general text and the test exact match, each next to that
adapter's own bf16 merge: what the int4 rounding costs.

    python train.py recipes/quickstart.yaml
    python train.py recipes/quickstart-qat.yaml
    python scripts/qat_report.py outputs/quickstart outputs/quickstart-qat --out /tmp/qat-report
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

EXPORTS = {"bf16": ["--quantize", "none"], "RTN": ["--quantize", "rtn"], "GPTQ": ["--quantize", "gptq"]}


def merge(adapter: Path, out: Path, export: str, args) -> dict:
    """One ``qlora-kit merge`` run; returns its report's evaluation of the written model."""
    grid = [] if export == "bf16" else ["--bits", str(args.bits), "--group-size", str(args.group_size), "--sym"]
    command = [
        sys.executable,
        "-m",
        "qlora_kit.cli",
        "merge",
        str(adapter),
        "--out",
        str(out),
        "--overwrite",
        *EXPORTS[export],
        *grid,
        "--calibration-samples",
        str(args.calibration_samples),
        "--calibration-seq-len",
        str(args.calibration_seq_len),
    ]
    print("+", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    results = json.loads((out / "report.json").read_text())["results"]
    return results[-1]  # the written model is evaluated last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged models and report.json")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--calibration-seq-len", type=int, default=512)
    args = parser.parse_args()

    table = {}
    for adapter in args.adapters:
        table[str(adapter)] = {e: merge(adapter, args.out / f"{adapter.name}-{e.lower()}", e, args) for e in EXPORTS}
    (args.out / "report.json").write_text(json.dumps(table, indent=2))

    print(
        f"\nint{args.bits}, group {args.group_size}, symmetric; perplexity on held-out text, exact match on the test split"
    )
    print(
        f"{'adapter':28}{'export':8}{'val loss':>10}{'vs bf16':>10}{'perplexity':>12}{'vs bf16':>10}"
        f"{'exact match':>13}{'vs bf16':>10}"
    )
    for adapter, rows in table.items():
        bf16 = rows["bf16"]
        for export, r in rows.items():
            print(
                f"{adapter:28}{export:8}{r['val_loss']:10.4f}{r['val_loss'] - bf16['val_loss']:+10.4f}"
                f"{r['perplexity']:12.2f}{r['perplexity'] / bf16['perplexity']:9.2f}x"
                f"{r['exact_match']:12.1%}{(r['exact_match'] - bf16['exact_match']) * 100:+9.1f}pp"
            )


if __name__ == "__main__":
    main()
