"""Nothing lost: runs killed with SIGKILL, on the tiny model.

A training run killed mid-run resumes (``training.resume=true``) from its last complete
checkpoint to the same loss at every step and the same final adapter as a run that was
never interrupted; a checkpoint half-written when the kill came is skipped. A merge killed
while writing leaves no output directory, and the next merge clears what it left.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.cli import main
from qlora_kit.model.adapters import ADAPTER_WEIGHTS
from qlora_kit.pipelines.export import remove_stale_partials
from qlora_kit.pipelines.train import last_complete_checkpoint

ROOT = Path(__file__).resolve().parent.parent
STEPS = 30


def _train_py(log: Path, recipe: Path, *overrides: str) -> subprocess.Popen:
    """train.py on ``recipe`` in the background; its stderr goes to ``log`` (a pipe could fill and block it)."""
    with log.open("w") as stderr:
        run = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), str(recipe), *overrides], stdout=subprocess.DEVNULL, stderr=stderr
        )
    return run


def _recipe(path: Path, model: Path, task: Path, out: Path) -> Path:
    path.write_text(
        f"model: {{name_or_path: '{model}'}}\n"
        f"data: {{train: '{task}/train.jsonl', max_seq_len: 64}}\n"
        "lora: {r: 8, alpha: 16}\n"
        f"training: {{max_steps: {STEPS}, batch_size: 4, learning_rate: 3.0e-3, warmup_ratio: 0.1, "
        "logging_steps: 1, save_steps: 5, save_total_limit: 2, lr_scheduler: cosine}\n"
        f"output: {{dir: '{out}', report_to: none}}\n"
    )
    return path


def _losses(out: Path) -> dict[int, float]:
    """Step -> training loss, from the final checkpoint's log history (a resumed run's includes the steps before)."""
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, task_files):
    straight = tmp_path / "straight"
    log = tmp_path / "train.log"
    run = _train_py(log, _recipe(tmp_path / "a.yaml", tiny_model_dir, task_files, straight))
    assert run.wait(timeout=600) == 0, log.read_text()[-3000:]

    out = tmp_path / "killed"
    recipe = _recipe(tmp_path / "b.yaml", tiny_model_dir, task_files, out)
    run = _train_py(log, recipe)
    # Kill as soon as the second checkpoint's folder appears: likely while it is being written.
    while not (out / "checkpoint-10").exists() and run.poll() is None:
        time.sleep(0.002)
    run.send_signal(signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL
    assert not (out / ADAPTER_WEIGHTS).exists()  # killed mid-run
    resume_from = last_complete_checkpoint(out)
    assert resume_from is not None and resume_from.name in ("checkpoint-5", "checkpoint-10")

    run = _train_py(log, recipe, "training.resume=true")
    assert run.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert f"resuming from {resume_from}" in log.read_text()
    expected, resumed = _losses(straight), _losses(out)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert resumed == expected  # step for step, exactly
    a, b = load_file(str(straight / ADAPTER_WEIGHTS)), load_file(str(out / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_half_written_checkpoints_are_skipped(tmp_path):
    def checkpoint(step: int, state: str | None, adapter: bool = True) -> None:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if adapter:
            (d / ADAPTER_WEIGHTS).write_bytes(b"weights")
        if state is not None:
            (d / "trainer_state.json").write_text(state)

    checkpoint(2, json.dumps({"global_step": 2}))
    checkpoint(4, json.dumps({"global_step": 4}))
    checkpoint(6, json.dumps({"global_step": 6}), adapter=False)  # killed before the weights were renamed in
    checkpoint(8, None)  # killed before trainer_state.json, the last file
    checkpoint(10, '{"global_step": 1')  # killed while writing trainer_state.json
    (tmp_path / "checkpoint-final").mkdir()
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-4"


def test_killed_merge_leaves_no_output_and_the_next_one_clears_it(tmp_path, tiny_model_dir):
    from qlora_kit.model.adapters import add_lora, peft_config, save_adapter
    from qlora_kit.model.load import load_quantized
    from qlora_kit.model.sources import load_tokenizer, resolve_source

    adapter = tmp_path / "adapter"
    model = load_quantized(str(tiny_model_dir), device="cpu", compute_dtype="float32", progress=False)
    add_lora(model, r=4, alpha=8)
    save_adapter(model, adapter, peft_config(model, 4, 8, 0.0, False, str(tiny_model_dir)))
    load_tokenizer(resolve_source(str(tiny_model_dir))).save_pretrained(adapter)

    out = tmp_path / "merged"
    merge = subprocess.Popen(
        [sys.executable, "-m", "qlora_kit.cli", "merge", str(adapter), "--out", str(out), "--no-eval"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not list(tmp_path.glob("merged.partial-*")) and merge.poll() is None:
        time.sleep(0.002)
    merge.send_signal(signal.SIGKILL)
    assert merge.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists()
    assert [p.name for p in tmp_path.glob("merged*")] == [f"merged.partial-{merge.pid}"]

    live = tmp_path / f"merged.partial-{os.getppid()}"  # a merge still running (our parent stands in)
    live.mkdir()
    remove_stale_partials(out)
    assert [p.name for p in tmp_path.glob("merged*")] == [live.name]
    live.rmdir()

    (tmp_path / f"merged.partial-{merge.pid}").mkdir()
    assert main(["merge", str(adapter), "--out", str(out), "--no-eval"]) == 0
    assert [p.name for p in tmp_path.glob("merged*")] == ["merged"] and (out / "config.json").is_file()
