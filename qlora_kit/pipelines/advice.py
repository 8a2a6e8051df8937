"""What the out-of-memory and disk-full messages of ``train`` and ``merge`` add: the settings
that need less GPU memory (as ``key=value`` with the current value), and what a failed run kept.

Only settings that would change something are listed, cheapest in speed first.
"""

from __future__ import annotations

from pathlib import Path

from qlora_kit.config import Recipe
from qlora_kit.pipelines.train import last_complete_checkpoint


def training_levers(recipe: Recipe) -> list[str]:
    """The recipe keys that lower training's GPU memory, given what ``recipe`` sets now."""
    t, levers = recipe.training, []
    if t.batch_size > 1:
        half = t.batch_size // 2
        accumulation = t.gradient_accumulation_steps * t.batch_size // half
        levers.append(
            f"training.batch_size={half} (now {t.batch_size}) with training.gradient_accumulation_steps="
            f"{accumulation} (same examples per step)"
        )
    if recipe.data.max_seq_len > 1:
        levers.append(f"data.max_seq_len={recipe.data.max_seq_len // 2} (now {recipe.data.max_seq_len})")
    if not t.gradient_checkpointing:
        levers.append("training.gradient_checkpointing=true")
    if t.gradient_checkpointing and t.uncheckpointed_layers > 0:
        levers.append(f"training.uncheckpointed_layers=0 (now {t.uncheckpointed_layers})")
    if t.offload_activations is not True:
        levers.append(f"training.offload_activations=true (now {t.offload_activations})")
    if not t.offload_embeddings:
        levers.append("training.offload_embeddings=true")
    if not t.optimizer_in_backward:
        levers.append("training.optimizer_in_backward=true (with gradient_accumulation_steps=1)")
    elif not t.offload_adapters:
        levers.append("training.offload_adapters=true")
    return levers


def training_kept(recipe: Recipe) -> str:
    """What a failed training run left: the checkpoint ``training.resume=true`` continues from."""
    out = Path(recipe.output.dir)
    checkpoint = last_complete_checkpoint(out) if out.is_dir() else None
    if checkpoint is None:
        return f"No checkpoint was complete yet in {out}"
    return f"The checkpoints in {out} are intact: add training.resume=true to continue from {checkpoint.name}"


def merge_levers(options) -> list[str]:
    """The ``qlora-kit merge`` options that lower its GPU memory, given ``options`` (a MergeOptions)."""
    levers = []
    calibrated = options.quantize in ("gptq", "awq") or options.report
    if calibrated:
        levers.append(
            f"--calibration-samples {max(options.calibration_samples // 2, 1)} (now {options.calibration_samples})"
        )
        levers.append(
            f"--calibration-seq-len {max(options.calibration_seq_len // 2, 1)} (now {options.calibration_seq_len})"
        )
    if options.report:
        levers.append("no --report (it builds every export in memory)")
    if options.evaluate:
        levers.append("--no-eval")
    if options.device != "cpu":
        levers.append("--device cpu (slower, in host memory)")
    return levers


def merge_kept(options) -> str:
    """What a failed merge left: nothing under ``--out`` (the writer deletes its partial directory)."""
    return f"Nothing was written to {options.out}"
