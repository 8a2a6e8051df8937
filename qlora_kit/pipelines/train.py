"""The training pipeline: recipe -> data -> NF4 model + LoRA -> Trainer -> adapter directory.

Everything that can be checked without the model (recipe, output directory, data) is
checked first. The Hugging Face Trainer supplies gradient accumulation, schedules,
logging, evaluation, checkpointing and resume; this module supplies the model, the
loss, the optimizer choice and PEFT-format saving.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from qlora_kit.config import Recipe, RecipeError, save_recipe
from qlora_kit.data import DataCollator, SFTData, build_datasets
from qlora_kit.errors import UserInputError
from qlora_kit.model.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    add_lora,
    load_adapter_weights,
    lora_modules,
    peft_config,
    save_adapter,
)
from qlora_kit.model.fsdp import (
    fsdp_plugin_from_launch,
    full_optimizer_state,
    is_sharded,
    nf4_storage_bytes,
    shard_model,
    shard_optimizer_state,
)
from qlora_kit.model.fused import use_fused_ops
from qlora_kit.model.load import load_quantized, resolve_compute_dtype
from qlora_kit.model.offload import offload_embeddings, use_offloaded_checkpointing
from qlora_kit.model.sft import SFTModel
from qlora_kit.model.sources import load_tokenizer, resolve_source
from qlora_kit.modules.fake_quant import FakeQuantConfig
from qlora_kit.modules.lora import cached_qat_weights, enable_qat, set_qat_active
from qlora_kit.pipelines.evaluate import exact_match_accuracy
from qlora_kit.pipelines.optim import full_precision_adapters, optimizer_in_backward, optimizer_name

log = logging.getLogger("qlora_kit")

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
LOSS_CURVE = "loss_curve.png"
_CHECKPOINT_PREFIX = "checkpoint-"


class OutputDirError(UserInputError):
    """The output directory holds a run that would be overwritten; the message says what to set."""


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` that finished saving (trainer_state.json is written last).

    A run killed while saving leaves a partial directory; it is skipped, and every
    earlier checkpoint is still there because the Trainer deletes old checkpoints only
    after a new one is complete.
    """
    complete = [
        d
        for d in output_dir.glob(f"{_CHECKPOINT_PREFIX}*")
        if d.name[len(_CHECKPOINT_PREFIX) :].isdigit()
        and (d / "trainer_state.json").is_file()
        and (d / ADAPTER_WEIGHTS).is_file()
    ]
    return max(complete, key=lambda d: int(d.name[len(_CHECKPOINT_PREFIX) :]), default=None)


def prepare_output_dir(recipe: Recipe) -> Path | None:
    """Check the output directory against overwrite/resume; returns the checkpoint to resume from."""
    out = Path(recipe.output.dir)
    holds_run = out.is_dir() and (any(out.glob(f"{_CHECKPOINT_PREFIX}*")) or (out / ADAPTER_WEIGHTS).exists())
    if recipe.training.resume:
        checkpoint = last_complete_checkpoint(out) if out.is_dir() else None
        if checkpoint is None:
            log.warning("training.resume=true but %s has no complete checkpoint: starting from step 0", out)
        return checkpoint
    if holds_run and not recipe.output.overwrite:
        raise OutputDirError(
            f"output.dir '{out}' already holds a run; set output.overwrite=true to replace it "
            "or training.resume=true to continue it"
        )
    if holds_run:
        for stale in [*out.glob(f"{_CHECKPOINT_PREFIX}*"), out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    return None


def training_steps(recipe: Recipe, rows: int, processes: int) -> int:
    """Optimizer steps of the run, as the Trainer counts them (for schedules built outside it)."""
    t = recipe.training
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(rows / (t.batch_size * processes))
    return math.ceil(t.epochs * max(batches // t.gradient_accumulation_steps, 1))


def setup_qat(lm, recipe: Recipe) -> list:
    """Put the recipe's fake-quant on every LoRA layer; returns the Trainer callbacks it needs."""
    from transformers import TrainerCallback

    q = recipe.qat
    cfg = FakeQuantConfig(q.format, q.bits, q.group_size, q.symmetric, q.activation_bits)
    try:
        enable_qat(lm, cfg, active=q.start_step == 0)
    except ValueError as e:  # e.g. a group size that does not divide a layer's input size
        raise RecipeError(f"qat: {e}") from None
    log.info(
        "QAT: %s%d%s, group size %d, from step %d",
        q.format,
        q.bits,
        " symmetric" if q.symmetric else "",
        q.group_size,
        q.start_step,
    )

    class StartQAT(TrainerCallback):
        """Switches fake-quant on at qat.start_step (also when resuming past it)."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= q.start_step:
                set_qat_active(lm, True)

    return [StartQAT()] if q.start_step > 0 else []


def _trainer_class():
    from transformers import Trainer
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

    class QLoRATrainer(Trainer):
        """Saves and restores only the adapters, in PEFT's format.

        Under FSDP the checkpoints hold the same files as on one GPU: the Trainer's own FSDP
        saving would gather the whole model's state dict and write FSDP-specific files, so
        here every process gathers the sharded LoRA weights and optimizer states, and the
        main process writes them as one GPU does.
        """

        def __init__(self, *args, adapter_config, **kwargs):
            super().__init__(*args, **kwargs)
            self.adapter_config = adapter_config

        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            if self.args.should_save:
                with full_precision_adapters(self.model.lm):
                    save_adapter(self.model.lm, output_dir or self.args.output_dir, self.adapter_config)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            lm = (model or self.model).lm
            with full_precision_adapters(lm):
                load_adapter_weights(lm, resume_from_checkpoint)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            if not is_sharded(self.model):
                return super().save_model(output_dir, _internal_call)
            save_adapter(
                self.model.lm, output_dir or self.args.output_dir, self.adapter_config, write=self.args.should_save
            )

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if not is_sharded(self.model):
                return super()._save_optimizer_and_scheduler(output_dir)
            optimizer_state = full_optimizer_state(self.optimizer)
            if self.args.should_save:
                torch.save(optimizer_state, Path(output_dir) / OPTIMIZER_NAME)
                torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            if not is_sharded(self.model) or checkpoint is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            optimizer_state = torch.load(Path(checkpoint) / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(shard_optimizer_state(optimizer_state, self.optimizer))
            self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

    return QLoRATrainer


def training_arguments(
    recipe: Recipe,
    device: torch.device,
    compute_dtype: torch.dtype,
    has_validation: bool,
    eval_on_start: bool = False,
    sharded: bool = False,
):
    """The Trainer's arguments; ``eval_on_start``: validate before the first step; ``sharded``: under FSDP."""
    from transformers import TrainingArguments

    t = recipe.training
    return TrainingArguments(
        output_dir=recipe.output.dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=max(t.batch_size, 32),  # no gradients: larger batches fit
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer_name(t.optimizer, device, sharded),
        bf16=device.type == "cuda" and compute_dtype == torch.bfloat16,
        fp16=device.type == "cuda" and compute_dtype == torch.float16,
        seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_validation and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        eval_on_start=eval_on_start and has_validation,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=[] if recipe.output.report_to == "none" else [recipe.output.report_to],
        prediction_loss_only=True,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        # The NF4 weights are buffers that every process loaded identically: broadcasting them
        # before every forward (DDP's default) would copy the whole model each step.
        ddp_broadcast_buffers=False,
        use_cpu=device.type == "cpu",
    )


def evaluate(trainer, lm, tokenizer, data: SFTData, recipe: Recipe, validation: bool = True) -> dict:
    """Validation loss (when there is a validation split) and exact-match accuracy on the test split."""
    metrics = {}
    if validation and data.validation is not None:
        metrics["val_loss"] = trainer.evaluate()["eval_loss"]
    if data.test:
        examples = data.test[: recipe.eval.max_test_examples] if recipe.eval.max_test_examples else data.test
        # On the CPU, QAT's torch fake-quant would otherwise round every weight again for each new token.
        cache = cached_qat_weights(lm) if trainer.args.device.type == "cpu" else nullcontext()
        main = trainer.accelerator.is_main_process
        # Under FSDP every process holds a slice of the weights: all of them generate, through
        # the root module, which gathers its weights around generate().
        if main or is_sharded(trainer.model):
            with cache:
                accuracy, _ = exact_match_accuracy(
                    trainer.model, tokenizer, examples, recipe.eval.max_new_tokens, progress=main
                )
            metrics["test_exact_match"] = accuracy
        trainer.accelerator.wait_for_everyone()
    return metrics


def save_loss_curve(log_history: list[dict], path: Path) -> None:
    """Training (and validation) loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(e["step"], e[key]) for e in log_history if key in e]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")  # SFT losses fall by orders of magnitude
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(recipe: Recipe) -> dict:
    """Run a recipe end to end; returns the before/after metrics (also in ``metrics.json``)."""
    from accelerate import PartialState
    from transformers import get_scheduler

    # Without CUDA, processes launched together form a gloo group (accelerate's FSDP launcher,
    # unlike its others, does not pass use_cpu on to them).
    state = PartialState(cpu=not torch.cuda.is_available())
    fsdp = fsdp_plugin_from_launch()
    sharded = fsdp is not None
    resume_from = prepare_output_dir(recipe)
    out = Path(recipe.output.dir)
    if state.is_main_process:
        save_recipe(recipe, out / RECIPE_FILE)

    source = resolve_source(recipe.model.name_or_path, recipe.model.gguf_file)
    tokenizer = load_tokenizer(source)
    data = build_datasets(recipe.data, tokenizer, recipe.training.seed)
    log.info(
        "data: %d training rows, %s validation rows, %s test examples, %d skipped",
        len(data.train),
        len(data.validation) if data.validation is not None else 0,
        len(data.test or []),
        data.skipped,
    )

    device = state.device
    compute_dtype = resolve_compute_dtype(recipe.model.compute_dtype, device)
    torch.manual_seed(recipe.training.seed)
    # Under FSDP the model waits in CPU memory until shard_model spreads it over the GPUs.
    lm = load_quantized(
        source,
        device=device,
        compute_dtype=compute_dtype,
        attn_implementation=recipe.model.attn_implementation,
        kernel=recipe.quantization.kernel,
        progress=state.is_main_process,
        keep_on="cpu" if sharded else None,
    )
    lora = recipe.lora
    add_lora(lm, lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.use_rslora)
    callbacks = setup_qat(lm, recipe) if recipe.qat.enabled else []
    if recipe.training.fused_kernels:
        use_fused_ops(lm)
    else:  # the plain PyTorch path: stock ops, plain LoRA autograd, full-logits loss
        for m in lora_modules(lm).values():
            m.fused = False
    lm.config.use_cache = False
    t = recipe.training
    if t.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in lm.model.layers[max(len(lm.model.layers) - t.uncheckpointed_layers, 0) :]:
            layer.gradient_checkpointing = False
        if t.offload_activations:
            use_offloaded_checkpointing(lm)
    if t.offload_embeddings:
        if sharded:
            raise RecipeError(
                "training.offload_embeddings does not work under FSDP, which shards the embeddings "
                "over the GPUs with the rest of the model: set it to false"
            )
        try:
            offload_embeddings(lm)
        except ValueError as e:
            raise RecipeError(f"training.offload_embeddings: {e}") from None
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s: %.2fM trainable parameters", lora.r, lora.target_modules, trainable / 1e6)

    adapter_config = peft_config(lm, lora.r, lora.alpha, lora.dropout, lora.use_rslora, recipe.model.name_or_path)
    optimizers = (None, None)
    if t.optimizer_in_backward:
        if state.num_processes > 1:
            raise RecipeError(
                "training.optimizer_in_backward works in a single process: its hooks would step "
                "before the gradients of other processes are reduced"
            )
        steps = training_steps(recipe, len(data.train), state.num_processes)
        optimizers = optimizer_in_backward(
            lm,
            optimizer_name(t.optimizer, device),
            t.learning_rate,
            t.weight_decay,
            lambda opt: get_scheduler(t.lr_scheduler, opt, math.ceil(t.warmup_ratio * steps), steps),
            offload_adapters=t.offload_adapters,
        )
    model = SFTModel(lm, chunked_loss=recipe.training.fused_kernels)
    if sharded:
        shard_model(model, lm.model.layers, fsdp.reshard_after_forward)
        # accelerate runs FSDP on GPUs only; on the CPU (gloo) it would wrap the sharded model
        # in DDP. Marked as prepared, accelerate leaves it as it is on both.
        model._is_accelerate_prepared = True
        local, total = nf4_storage_bytes(lm)
        log.info(
            "FSDP over %d processes: this one holds %.1f%% of the %.1f MB of NF4 weights",
            state.num_processes,
            100 * local / total,
            total / 2**20,
        )
    trainer = _trainer_class()(
        model=model,
        args=training_arguments(
            recipe,
            device,
            compute_dtype,
            data.validation is not None,
            eval_on_start=resume_from is None,
            sharded=sharded,
        ),
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=DataCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=optimizers,
        adapter_config=adapter_config,
    )

    # The validation loss before training comes from the Trainer's eval_on_start: under FSDP
    # the Trainer can evaluate only once it has prepared the model and the optimizer together.
    before = evaluate(trainer, lm, tokenizer, data, recipe, validation=False) if resume_from is None else {}
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if resume_from is None and data.validation is not None:
        before["val_loss"] = next(e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e)
    after = evaluate(trainer, lm, tokenizer, data, recipe)

    metrics = {"before": before, "after": after, "train_steps": trainer.state.global_step}
    with full_precision_adapters(lm):
        save_adapter(lm, out, adapter_config, write=state.is_main_process)  # under FSDP a collective
    if state.is_main_process:
        tokenizer.save_pretrained(out)
        save_loss_curve(trainer.state.log_history, out / LOSS_CURVE)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        print(format_metrics(metrics, out))
    state.wait_for_everyone()
    return metrics


def format_metrics(metrics: dict, out: Path) -> str:
    """The before/after table printed at the end of a run."""
    rows = [("validation loss", "val_loss", "{:.4f}"), ("test exact match", "test_exact_match", "{:.1%}")]
    lines = [f"\n{'':20}{'before':>12}{'after':>12}"]
    for label, key, fmt in rows:
        if key in metrics["after"]:
            before = fmt.format(metrics["before"][key]) if key in metrics["before"] else "-"
            lines.append(f"{label:20}{before:>12}{fmt.format(metrics['after'][key]):>12}")
    lines.append(f"\nadapter, tokenizer, recipe, metrics and loss curve in {out}/")
    return "\n".join(lines)
