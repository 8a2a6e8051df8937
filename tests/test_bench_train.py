"""scripts/bench_train.py's plumbing on the CPU (--dry-run): every side in its own process, the
results read back, skips for missing packages, --pythonpath reaching only its side."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_runs_each_side_in_its_own_process(tmp_path):
    # A stand-in liger_kernel on the liger side's --pythonpath only: its import error must be the skip reason.
    fake = tmp_path / "fake" / "liger_kernel"
    (fake / "transformers").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "transformers" / "__init__.py").write_text("raise ImportError('stand-in liger_kernel from --pythonpath')\n")
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_train.py"),
            "--dry-run",
            "--side",
            "ours,stock,liger,unsloth",
            "--pythonpath",
            f"liger={tmp_path / 'fake'}",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    sides = results["sides"]
    assert list(sides) == ["ours", "stock", "liger", "unsloth"]
    pids = {results["pid"], sides["ours"]["pid"], sides["stock"]["pid"]}
    assert len(pids) == 3  # the parent and one process per measured side
    for side in ("ours", "stock"):
        r = sides[side]
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and len(r["losses"]) == 3  # 1 warm-up + 2 timed
        assert r["batch"] == 2 and r["seq"] == 32
        # Random init with std 0.02: near-uniform logits, so the first loss is about ln(vocab).
        assert abs(r["losses"][0] - math.log(256)) < 0.1, r["losses"]
        assert r["lora_params"] == sides["ours"]["lora_params"]  # r=16 on the same seven projections
    assert "stand-in liger_kernel from --pythonpath" in sides["liger"]["skipped"]
    assert "unsloth" in sides["unsloth"]["skipped"]
    assert "tokens/s, row / column:" in proc.stdout
    assert "skipped: " in proc.stdout
