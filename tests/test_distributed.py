"""Data parallel through accelerate: 2 CPU processes (gloo) equal 1 process with 2x gradient accumulation."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.model.adapters import ADAPTER_WEIGHTS
from qlora_kit.pipelines.train import train

pytestmark = pytest.mark.slow  # trains, and launches two processes


def test_two_processes_all_reduce_the_adapters(
    tmp_path, tiny_model_dir, identical_rows_task, make_recipe, accelerate_launch
):
    steps = ["training.max_steps=4", "training.batch_size=4", "training.save_steps=100", "data.test=null"]
    single = make_recipe(
        tmp_path / "single", tiny_model_dir, identical_rows_task, *steps, "training.gradient_accumulation_steps=2"
    )
    train(single)

    make_recipe(tmp_path / "ddp", tiny_model_dir, identical_rows_task, *steps)  # writes tmp_path/ddp/recipe.yaml
    result = accelerate_launch("ddp-cpu.yaml", tmp_path / "ddp" / "recipe.yaml", *steps)
    assert result.returncode == 0, result.stderr[-3000:]

    # The same losses and gradient norms step by step: the all-reduced gradient is the accumulated one.
    logs = [
        json.loads((tmp_path / run / "out" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        for run in ("single", "ddp")
    ]
    steps_a, steps_b = ([(e["loss"], e["grad_norm"]) for e in log if "grad_norm" in e] for log in logs)
    assert len(steps_a) == 4 and torch.allclose(torch.tensor(steps_a), torch.tensor(steps_b), rtol=1e-5)
    # Adam divides by sqrt(v), which magnifies float-rounding differences of near-zero gradients.
    a = load_file(str(Path(single.output.dir) / ADAPTER_WEIGHTS))
    b = load_file(str(tmp_path / "ddp" / "out" / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in b.items() if "lora_B" in k)  # it trained
