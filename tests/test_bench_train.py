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


def test_memory_peak_report_lists_what_is_alive_at_the_peak_by_origin():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)

    def frames(path, line, name):
        return [{"filename": "/usr/lib/python3/torch/autograd.py", "line": 9, "name": "apply"}] + [
            {"filename": path, "line": line, "name": name}
        ]

    gib = 2**30
    mlp, attn = (
        frames("/x/qlora_kit/modules/tiled_mlp.py", 80, "forward"),
        frames("/x/transformers/llama.py", 5, "attn"),
    )
    trace = [
        {"action": "alloc", "addr": 1, "size": 2 * gib, "frames": mlp},
        {"action": "alloc", "addr": 2, "size": gib, "frames": attn},
        {"action": "alloc", "addr": 3, "size": gib, "frames": mlp},
        {"action": "free_requested", "addr": 1, "size": 2 * gib},
        {"action": "free_completed", "addr": 1, "size": 2 * gib},
        {"action": "alloc", "addr": 4, "size": gib // 2, "frames": attn},  # 2.5 GiB now: below the 4 GiB peak
        {"action": "free_completed", "addr": 99, "size": gib},  # allocated before the recording: not counted
    ]
    report = bench_train.peak_report({"device_traces": [trace]}).splitlines()
    assert report[0].startswith("allocated during the step, at its peak: 4.00 GiB in 3 blocks")
    assert report[1].split() == ["3.000", "GiB", "2", "blocks", "tiled_mlp.py:80", "forward"]
    assert report[2].split() == ["1.000", "GiB", "1", "blocks", "llama.py:5", "attn"]


def test_gpu_timeline_counts_overlapping_kernels_once():
    """A profiled step's kernel time per stream and overall: the union of the kernels' intervals."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from bench_common import busy_time, gpu_timeline
    finally:
        sys.path.remove(str(REPO / "scripts"))

    assert busy_time([(20, 30), (0, 10), (5, 15), (6, 7)]) == 25
    assert busy_time([]) == 0

    def kernel(stream, start, end, device=DeviceType.CUDA):
        return SimpleNamespace(
            device_type=device, device_resource_id=stream, time_range=SimpleNamespace(start=start, end=end)
        )

    events = [
        kernel(7, 0, 10_000),
        kernel(7, 5_000, 15_000),
        kernel(9, 12_000, 40_000),
        kernel(0, 0, 90_000, DeviceType.CPU),
    ]
    assert gpu_timeline(events).splitlines() == [
        "kernels from first to last: 40.0 ms; some kernel running: 100%",
        "  stream 9: 1 kernels, busy 28.0 ms (70%)",
        "  stream 7: 2 kernels, busy 15.0 ms (38%)",
    ]
    assert gpu_timeline(events[-1:]) == "no CUDA kernels recorded"


def test_idle_report_puts_gaps_down_to_the_launch_after_them():
    """A gap whose kernel was launched after the stream went idle is the host's; one launched before, a wait."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from bench_common import idle_report
    finally:
        sys.path.remove(str(REPO / "scripts"))

    def event(id, name, start, end, device=DeviceType.CPU, parent=None):
        return SimpleNamespace(
            id=id,
            name=name,
            device_type=device,
            device_resource_id=7,
            time_range=SimpleNamespace(start=start, end=end),
            cpu_parent=parent,
        )

    node = event(1000, "autograd::engine::evaluate_function: MulBackward0", 0, 500)
    mul = event(1001, "aten::mul", 200, 300, parent=node)
    add = event(1002, "aten::add", 10, 20)
    events = [
        node,
        mul,
        add,
        event(1, "cudaLaunchKernel", 5, 6, parent=add),  # launched early: its kernel waited
        event(2, "cudaLaunchKernel", 12, 13, parent=add),
        event(3, "cudaLaunchKernel", 250, 251, parent=mul),  # launched after the stream went idle at 110
        event(1, "first", 0, 100, DeviceType.CUDA),
        event(2, "waited", 102, 110, DeviceType.CUDA),  # a 2 us gap: under the threshold
        event(3, "late", 260, 270, DeviceType.CUDA),
        event(4, "unmatched", 300, 310, DeviceType.CUDA),
    ]
    lines = idle_report(events).splitlines()
    assert lines[0] == (
        "idle gaps >= 5 us on the busiest stream: 0.2 ms (host late 0.1 ms, waiting 0.0 ms, launch not found 0.0 ms)"
    )
    assert lines[1].split() == ["0.15", "ms", "1", "gaps", "host", "MulBackward0", "aten::mul"]
    assert lines[2].split() == ["0.03", "ms", "1", "gaps", "?", "[unattributed]", "unmatched"]
    events[7].time_range.start = 150  # launched at 12, before the stream went idle at 100
    assert idle_report(events).splitlines()[2].split()[:5] == ["0.05", "ms", "1", "gaps", "wait"]
