"""The training stack end to end on the CPU, on a tiny random Llama with SmolLM2's tokenizer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from qlora_kit.config import load_recipe
from qlora_kit.model.adapters import ADAPTER_WEIGHTS, add_lora, lora_modules, peft_config, save_adapter
from qlora_kit.model.load import load_quantized
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.pipelines.train import (
    OutputDirError,
    eval_batch_size,
    last_complete_checkpoint,
    train,
    training_arguments,
)
from qlora_kit.quant.nf4 import dequantize_nf4_reference

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "seq, batch, method, rows",
    [
        (128, 8, "sft", 32),
        (2048, 4, "sft", 8),
        (8192, 4, "sft", 4),
        (131072, 1, "sft", 1),
        (128, 4, "dpo", 32),
        (1024, 2, "dpo", 8),  # two sequences a row: 8 x 2 x 1024 = 16,384 tokens
        (1024, 2, "orpo", 8),
    ],
)
def test_passes_without_gradients_take_up_to_32_rows_and_16384_tokens(tmp_path, seq, batch, method, rows):
    """Validation (and DPO's reference pass) at long context: the training batch, not 32 rows of it."""
    keys = [f"data.max_seq_len={seq}", f"training.batch_size={batch}", f"training.method={method}"]
    recipe = load_recipe(ROOT / "recipes" / "bench.yaml", [*keys, f"output.dir={tmp_path}"])
    assert eval_batch_size(recipe) == rows
    args = training_arguments(recipe, torch.device("cpu"), torch.float32, has_validation=True)
    assert args.per_device_eval_batch_size == rows


@pytest.mark.slow
def test_end_to_end_training_lowers_the_loss(tmp_path, tiny_model_dir, task_files, make_recipe):
    recipe = make_recipe(tmp_path, tiny_model_dir, task_files)
    metrics = train(recipe)
    out = Path(recipe.output.dir)
    assert metrics["train_steps"] == 30
    # The tiny random model's logits are nearly flat (loss ~ ln(vocab)); 30 steps take ~1 nat off.
    assert metrics["after"]["val_loss"] < metrics["before"]["val_loss"] - 0.5
    assert metrics["after"]["test_exact_match"] > metrics["before"]["test_exact_match"]
    for name in (
        "adapter_config.json",
        ADAPTER_WEIGHTS,
        "recipe.yaml",
        "metrics.json",
        "test_generations.jsonl",
        "loss_curve.png",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    assert list(out.glob("runs/*/events.out.tfevents.*")), "TensorBoard logs"
    assert load_recipe(out / "recipe.yaml") == recipe
    assert json.loads((out / "metrics.json").read_text()) == metrics
    with pytest.raises(OutputDirError, match="output.overwrite=true"):
        train(recipe)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, tiny_model_dir, task_files, make_recipe):
    """4 steps + a kill + resume to 8 ends where 8 uninterrupted steps end; a half-written checkpoint is skipped."""
    straight = make_recipe(tmp_path / "a", tiny_model_dir, task_files, "training.max_steps=8", "training.save_steps=4")
    train(straight)

    interrupted = make_recipe(
        tmp_path / "b", tiny_model_dir, task_files, "training.max_steps=4", "training.save_steps=4"
    )
    train(interrupted)
    out = Path(interrupted.output.dir)
    (out / "checkpoint-6").mkdir()  # a run killed while saving: no trainer_state.json
    (out / "checkpoint-6" / ADAPTER_WEIGHTS).write_bytes(b"partial")
    assert last_complete_checkpoint(out).name == "checkpoint-4"
    resumed = make_recipe(
        tmp_path / "b",
        tiny_model_dir,
        task_files,
        "training.max_steps=8",
        "training.save_steps=4",
        "training.resume=true",
    )
    metrics = train(resumed)
    assert metrics["train_steps"] == 8
    a = load_file(str(Path(straight.output.dir) / ADAPTER_WEIGHTS))
    b = load_file(str(out / ADAPTER_WEIGHTS))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_adapters_load_in_peft_and_give_our_logits(tmp_path, tiny_model_dir):
    from peft import PeftModel

    ours = load_quantized(str(tiny_model_dir), device="cpu", compute_dtype="float32", progress=False)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        base_logits = ours(ids).logits
    add_lora(ours, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, base_logits)  # B = 0: step 0 is the base model
        for m in lora_modules(ours).values():
            m.lora_B.weight.normal_(0, 0.05)
        our_logits = ours(ids).logits
    save_adapter(ours, tmp_path / "adapter", peft_config(ours, 4, 8, 0.0, False, str(tiny_model_dir)))

    stock = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, NF4Linear):
                stock.get_submodule(name.removesuffix(".base")).weight.copy_(dequantize_nf4_reference(m.nf4_weight))
    peft_model = PeftModel.from_pretrained(stock, tmp_path / "adapter").eval()
    with torch.no_grad():
        peft_logits = peft_model(ids).logits
    assert torch.allclose(peft_logits, our_logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)


def test_unknown_lora_target_is_named(tiny_model_dir):
    model = load_quantized(str(tiny_model_dir), device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"no module named \['qproj'\].*q_proj"):
        add_lora(model, 4, 8, target_modules=["qproj"])


def _run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_bad_recipe_key_exits_cleanly(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data:\n  train: x.jsonl\nlora:\n  rank: 8\n")
    result = _run_cli(str(recipe), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{recipe}:4: unknown key 'lora.rank'" in result.stderr and "did you mean 'lora.r'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_bad_data_row_names_file_and_row(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "user", "content": "no answer"}]}\n'
    )
    result = _run_cli(
        "recipes/quickstart.yaml",
        f"model.name_or_path={tiny_model_dir}",
        f"data.train={data}",
        "data.validation=null",
        "data.test=null",
        f"output.dir={tmp_path / 'out'}",
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "row 2" in result.stderr and str(data) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_qat_run_switches_on_at_start_step(tmp_path, tiny_model_dir, task_files, make_recipe):
    from qlora_kit.modules.qat_lora import QATLoRALinear

    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        task_files,
        "qat.enabled=true",
        "qat.group_size=32",
        "qat.start_step=5",
        "training.max_steps=10",
        "data.test=null",
    )
    modes = []  # per forward of the first LoRA layer called: was fake-quant on?
    original = QATLoRALinear.forward

    def spy(self, x):
        if not modes or modes[0][0] is self:
            modes.append((self, self.active))
        return original(self, x)

    QATLoRALinear.forward = spy
    try:
        metrics = train(recipe)
    finally:
        QATLoRALinear.forward = original
    flags = [active for _, active in modes]
    switch = flags.index(True)
    assert not any(flags[:switch]) and all(flags[switch:])  # off, then on for good
    assert switch > 0 and len(flags) - switch > 5  # plain LoRA before step 5, QAT for steps 5-9 and after
    assert metrics["after"]["val_loss"] < metrics["before"]["val_loss"]


def test_qat_recipe_errors(tmp_path, tiny_model_dir, task_files, make_recipe):
    from qlora_kit.config import RecipeError

    with pytest.raises(RecipeError, match="lora.dropout"):
        make_recipe(tmp_path / "a", tiny_model_dir, task_files, "qat.enabled=true", "lora.dropout=0.1")
    recipe = make_recipe(tmp_path / "b", tiny_model_dir, task_files, "qat.enabled=true", "qat.group_size=48")
    with pytest.raises(RecipeError, match=r"qat: model\.layers\.0\..*group_size"):
        train(recipe)
