"""The training pipeline: recipe -> data -> NF4 model + LoRA -> Trainer -> adapter directory.

Its length: the Trainer subclass's PEFT/FSDP saving and checkpoint completeness rules sit beside
the pipeline they serve.

Everything that can be checked without the model (recipe, output directory, data) is
checked first. The Hugging Face Trainer supplies gradient accumulation, schedules,
logging, evaluation, checkpointing and resume; this module supplies the model, the
loss, the optimizer choice and PEFT-format saving.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_kit.compat import check_trainer_hooks, checkpoint_file_names
from qlora_kit.config import Recipe, save_recipe
from qlora_kit.data import DataCollator, SFTData, build_datasets
from qlora_kit.errors import UserInputError, is_out_of_memory, saving_to
from qlora_kit.model.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter_weights,
    save_adapter,
)
from qlora_kit.model.fsdp import (
    fsdp_plugin_from_launch,
    full_optimizer_state,
    is_sharded,
    shard_optimizer_state,
)
from qlora_kit.model.load import check_supported
from qlora_kit.model.sources import ModelSource, load_config, load_tokenizer, resolve_source
from qlora_kit.modules.qat_lora import cached_qat_weights
from qlora_kit.pipelines.builder import TrainingModel, build_training_model
from qlora_kit.pipelines.evaluate import (
    GENERATIONS_FILE,
    ExactMatchResult,
    exact_match_accuracy,
    generation_budget,
    write_generations,
)
from qlora_kit.pipelines.matching import check_references
from qlora_kit.pipelines.optim import full_precision_adapters, optimizer_name, without_syncs

log = logging.getLogger("qlora_kit")

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
LOSS_CURVE = "loss_curve.png"
_CHECKPOINT_PREFIX = "checkpoint-"
_TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint
# The rows of an SFT run's before/after table: (label, metric key, format).
SFT_ROWS = (("validation loss", "val_loss", "{:.4f}"),)


class OutputDirError(UserInputError):
    """The output directory holds a run that would be overwritten; the message says what to set."""


class CheckpointError(UserInputError):
    """A checkpoint that cannot be resumed from; the message names it and what to do."""


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` that finished saving (trainer_state.json is written last).

    A run killed while saving leaves a partial directory (no trainer_state.json, or one cut
    short); it is skipped, and every earlier checkpoint is still there because the Trainer
    deletes old checkpoints only after a new one is complete.
    """
    complete = [
        d
        for d in output_dir.glob(f"{_CHECKPOINT_PREFIX}*")
        if d.name[len(_CHECKPOINT_PREFIX) :].isdigit() and _is_complete(d, int(d.name[len(_CHECKPOINT_PREFIX) :]))
    ]
    return max(complete, key=lambda d: int(d.name[len(_CHECKPOINT_PREFIX) :]), default=None)


def _is_complete(checkpoint: Path, step: int) -> bool:
    try:
        state = json.loads((checkpoint / _TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == step and (checkpoint / ADAPTER_WEIGHTS).is_file()


@contextmanager
def reading_checkpoint(checkpoint: str | None) -> Iterator[None]:
    """Report a checkpoint file that cannot be read, or that another recipe wrote, as a CheckpointError."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError) as e:
        if isinstance(e, UserInputError) or is_out_of_memory(e):
            raise
        reason = str(e).strip().partition("\n")[0].partition(". ")[0]  # torch's first sentence says it
        raise CheckpointError(
            f"cannot resume from {checkpoint} ({type(e).__name__}: {reason}): a file in it is corrupt, or a run "
            "with another recipe wrote it; delete that checkpoint to resume from the one before, or start again "
            "with training.resume=false output.overwrite=true"
        ) from e


def prepare_output_dir(recipe: Recipe) -> Path | None:
    """Check the output directory against overwrite/resume; returns the checkpoint to resume from."""
    out = Path(recipe.output.dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output.dir '{out}' is a file; name a directory")
    # A run's directory holds its recipe.yaml, or at least checkpoints (e.g. one copied in to resume from).
    is_run = (out / RECIPE_FILE).exists() or any(out.glob(f"{_CHECKPOINT_PREFIX}*"))
    foreign = out.is_dir() and not is_run and next(out.iterdir(), None)
    if foreign and not recipe.output.overwrite:
        raise OutputDirError(
            f"output.dir '{out}' holds files that are not a qlora-kit run (e.g. {foreign.name}); name a new or "
            "empty directory, or set output.overwrite=true to write into it"
        )
    holds_run = out.is_dir() and (any(out.glob(f"{_CHECKPOINT_PREFIX}*")) or (out / ADAPTER_WEIGHTS).exists())
    if recipe.training.resume:
        checkpoint = last_complete_checkpoint(out) if out.is_dir() else None
        if checkpoint is None:
            log.warning("training.resume=true but %s has no complete checkpoint: starting from step 0", out)
        else:
            log.info("resuming from %s", checkpoint)
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


# A pass without gradients (validation, reference log-probabilities) takes up to this many rows, and
# up to this many tokens at data.max_seq_len: it holds no activations for backward, but at long
# context one row is all that fits.
MAX_EVAL_ROWS = 32
MAX_EVAL_TOKENS = 16384


def eval_batch_size(recipe: Recipe) -> int:
    """Rows per batch of a pass without gradients: up to 32 rows and 16,384 tokens (a preference row
    holds two sequences), never fewer than training.batch_size."""
    tokens_per_row = recipe.data.max_seq_len * recipe.training.sequences_per_row
    return max(recipe.training.batch_size, min(MAX_EVAL_ROWS, MAX_EVAL_TOKENS // tokens_per_row))


def training_steps(recipe: Recipe, rows: int, processes: int) -> int:
    """Optimizer steps of the run, as the Trainer counts them (for schedules built outside it)."""
    t = recipe.training
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(rows / (t.batch_size * processes))
    return math.ceil(t.epochs * max(batches // t.gradient_accumulation_steps, 1))


def _trainer_class():
    from transformers import Trainer

    OPTIMIZER_NAME, SCHEDULER_NAME = checkpoint_file_names()

    class QLoRATrainer(Trainer):
        """Saves and restores only the adapters, in PEFT's format.

        Under FSDP the checkpoints hold the same files as on one GPU: the Trainer's own FSDP
        saving would gather the whole model's state dict and write FSDP-specific files, so
        here every process gathers the sharded LoRA weights and optimizer states, and the
        main process writes them as one GPU does. A checkpoint that cannot be resumed from is
        a CheckpointError; a full disk while saving one, an ENOSPC OSError naming it.
        """

        def __init__(self, *args, adapter_config, **kwargs):
            super().__init__(*args, **kwargs)
            self.adapter_config = adapter_config

        @staticmethod
        def get_optimizer_cls_and_kwargs(args, model=None):
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
            return without_syncs(optimizer_cls), optimizer_kwargs

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
            with reading_checkpoint(checkpoint):
                if not is_sharded(self.model) or checkpoint is None:
                    return super()._load_optimizer_and_scheduler(checkpoint)
                optimizer_state = torch.load(Path(checkpoint) / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
                self.optimizer.load_state_dict(shard_optimizer_state(optimizer_state, self.optimizer))
                self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

        def _load_rng_state(self, checkpoint: str | None) -> None:
            with reading_checkpoint(checkpoint):
                super()._load_rng_state(checkpoint)

        def _save_checkpoint(self, model, trial) -> None:
            # The writers report a full disk without the path, torch.save without the OS error too.
            with saving_to(Path(self.args.output_dir) / f"{_CHECKPOINT_PREFIX}{self.state.global_step}"):
                super()._save_checkpoint(model, trial)

    return check_trainer_hooks(QLoRATrainer)


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
        per_device_eval_batch_size=eval_batch_size(recipe),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        # A ratio, not a count: transformers 5 has no warmup_ratio and reads a warmup_steps < 1 as a
        # fraction of the training steps; the recipe keeps warmup_ratio in [0, 1).
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
        # Nothing in a step waits for the GPU, so the host queues the next step while this one runs:
        # batches come from pinned memory without blocking, the optimizer does not synchronize
        # (without_syncs), and a non-finite loss is logged as such rather than tested every step.
        dataloader_pin_memory=device.type == "cuda",
        accelerator_config={"non_blocking": device.type == "cuda"},
        logging_nan_inf_filter=False,
    )


def evaluate(
    trainer, lm, tokenizer, data: SFTData, recipe: Recipe, test: ExactMatchPlan, validation: bool = True
) -> tuple[dict, ExactMatchResult | None]:
    """Validation loss (when there is a validation split) and exact-match accuracy on ``test``'s examples,
    with the test result itself on the processes that generated (else None)."""
    metrics, result = {}, None
    if validation and data.validation is not None:
        metrics["val_loss"] = trainer.evaluate()["eval_loss"]
    if test.examples:
        # On the CPU, QAT's torch fake-quant would otherwise round every weight again for each new token.
        cache = cached_qat_weights(lm) if trainer.args.device.type == "cpu" else nullcontext()
        main = trainer.accelerator.is_main_process
        # Under FSDP every process holds a slice of the weights: all of them generate, through
        # the root module, which gathers its weights around generate().
        if main or is_sharded(trainer.model):
            with cache:
                result = exact_match_accuracy(
                    trainer.model, tokenizer, test.examples, test.max_new_tokens, recipe.eval.match, progress=main
                )
            metrics["test_exact_match"] = result.accuracy
            metrics["test_cut"] = result.cut
        trainer.accelerator.wait_for_everyone()
    return metrics, result


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
    if recipe.training.method != "sft":  # DPO, ORPO
        from qlora_kit.pipelines.preference import train_preference  # it builds on this module

        return train_preference(recipe)

    run = start_run(recipe)
    data = build_datasets(recipe.data, run.tokenizer, recipe.training.seed)
    log.info(
        "data: %d training rows, %s validation rows, %s test examples, %d skipped",
        len(data.train),
        len(data.validation) if data.validation is not None else 0,
        len(data.test or []),
        data.skipped,
    )
    test = plan_test(data, recipe, run.tokenizer)
    built = build_run_model(run, recipe, len(data.train))
    lm = built.lm
    trainer = _trainer_class()(
        model=built.model,
        args=training_arguments(
            recipe,
            run.state.device,
            built.compute_dtype,
            data.validation is not None,
            eval_on_start=run.resume_from is None,
            sharded=run.fsdp is not None,
        ),
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=DataCollator(run.tokenizer),
        processing_class=run.tokenizer,
        callbacks=built.callbacks,
        optimizers=built.optimizers,
        adapter_config=built.adapter_config,
    )

    # The validation loss before training comes from the Trainer's eval_on_start: under FSDP
    # the Trainer can evaluate only once it has prepared the model and the optimizer together.
    before, before_test = {}, None
    if run.resume_from is None:
        before, before_test = evaluate(trainer, lm, run.tokenizer, data, recipe, test, validation=False)
    trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    if run.resume_from is None and data.validation is not None:
        before["val_loss"] = next(e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e)
    after, after_test = evaluate(trainer, lm, run.tokenizer, data, recipe, test)

    metrics = {"before": before, "after": after, "train_steps": trainer.state.global_step}
    return finish_run(run, recipe, trainer, built, metrics, test, (before_test, after_test))


@dataclass
class Run:
    """A training run's process state and what it reads and writes (:func:`start_run`)."""

    state: Any  # accelerate's PartialState
    fsdp: Any  # accelerate's FSDP plugin when launched with one, else None
    resume_from: Path | None  # the checkpoint to resume from
    source: ModelSource
    tokenizer: Any


def start_run(recipe: Recipe) -> Run:
    """What a run (SFT or preference) does before its data: join the launched processes, check the output
    directory (and find the checkpoint to resume from), save the recipe there, resolve the model."""
    from accelerate import PartialState

    # Without CUDA, processes launched together form a gloo group (accelerate's FSDP launcher,
    # unlike its others, does not pass use_cpu on to them).
    state = PartialState(cpu=not torch.cuda.is_available())
    fsdp = fsdp_plugin_from_launch()
    resume_from = prepare_output_dir(recipe)
    if state.is_main_process:
        save_recipe(recipe, Path(recipe.output.dir) / RECIPE_FILE)
    source = resolve_source(recipe.model.name_or_path, recipe.model.gguf_file)
    check_supported(load_config(source))  # before the data is tokenized
    return Run(state, fsdp, resume_from, source, load_tokenizer(source))


@dataclass
class ExactMatchPlan:
    """The test examples a run generates answers for, and the generation budget (None without a test)."""

    examples: list[dict] | None
    max_new_tokens: int | None


def plan_test(data: SFTData, recipe: Recipe, tokenizer) -> ExactMatchPlan:
    """The test examples that are evaluated (at most eval.max_test_examples), their references checked and
    the budget sized, before the model loads."""
    limit = recipe.eval.max_test_examples
    examples = data.test[:limit] if data.test and limit else data.test
    if not examples:
        return ExactMatchPlan(examples, None)
    check_references(recipe.eval.match, examples)
    return ExactMatchPlan(examples, generation_budget(tokenizer, examples, recipe.eval.max_new_tokens))


def build_run_model(run: Run, recipe: Recipe, rows: int) -> TrainingModel:
    """The recipe's training model (:func:`~qlora_kit.pipelines.builder.build_training_model`) for this run's
    processes, its schedules sized for ``rows`` training rows."""
    state = run.state
    return build_training_model(
        recipe,
        state.device,
        source=run.source,
        total_steps=training_steps(recipe, rows, state.num_processes),
        processes=state.num_processes,
        fsdp=run.fsdp,
        progress=state.is_main_process,
    )


def finish_run(
    run: Run,
    recipe: Recipe,
    trainer,
    built: TrainingModel,
    metrics: dict,
    test: ExactMatchPlan,
    test_results: tuple[ExactMatchResult | None, ExactMatchResult | None],
    rows: tuple = SFT_ROWS,
    width: int = 20,
) -> dict:
    """What a finished run (SFT or preference) leaves in output.dir: the adapter (under FSDP a collective,
    so every process calls this), and from the main process the tokenizer, the loss curve, ``metrics`` (the
    test's settings added) and the test generations (``test_results``: before and after training); then the
    before/after table (:func:`format_metrics` with ``rows`` and ``width``). Returns ``metrics``."""
    state, out, lm = run.state, Path(recipe.output.dir), built.lm
    before_test, after_test = test_results
    if test.examples:
        metrics["test"] = {
            "examples": len(test.examples),
            "max_new_tokens": test.max_new_tokens,
            "match": recipe.eval.match,
            "generations": GENERATIONS_FILE,
        }
    with full_precision_adapters(lm):
        save_adapter(lm, out, built.adapter_config, write=state.is_main_process)
    if state.is_main_process:
        run.tokenizer.save_pretrained(out)
        save_loss_curve(trainer.state.log_history, out / LOSS_CURVE)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        if after_test is not None:
            tests = {"before": before_test, "after": after_test} if before_test is not None else {"after": after_test}
            write_generations(out / GENERATIONS_FILE, tests)
        print(format_metrics(metrics, out, after_test, rows, width))
    state.wait_for_everyone()
    return metrics


def format_metrics(
    metrics: dict, out: Path, test: ExactMatchResult | None = None, rows: tuple = SFT_ROWS, width: int = 20
) -> str:
    """The before/after table printed at the end of a run (``rows``, then the test exact match and the
    answers the budget cut, labels ``width`` wide); with the final test result, a few of its wrong answers."""
    rows = [*rows, ("test exact match", "test_exact_match", "{:.1%}")]
    if any(stage.get("test_cut") for stage in (metrics["before"], metrics["after"])):
        budget, examples = metrics["test"]["max_new_tokens"], metrics["test"]["examples"]
        rows.append((f"  cut at {budget} tokens", "test_cut", f"{{}}/{examples}"))
    lines = [f"\n{'':{width}}{'before':>12}{'after':>12}"]
    for label, key, fmt in rows:
        if key in metrics["after"]:
            before = fmt.format(metrics["before"][key]) if key in metrics["before"] else "-"
            lines.append(f"{label:{width}}{before:>12}{fmt.format(metrics['after'][key]):>12}")
    if test is not None and test.cut:
        lines.append(f"\nafter training: {test.summary()}")
    mismatches = test.format_mismatches() if test is not None else ""
    if mismatches:
        lines.append(f"\n{mismatches}\nevery test generation, before and after: {out / GENERATIONS_FILE}")
    lines.append(f"\nadapter, tokenizer, recipe, metrics and loss curve in {out}/")
    return "\n".join(lines)
