"""Preference training: recipe -> pairs -> NF4 model + LoRA -> DPO or ORPO -> adapter directory.

Its length: the DPO/ORPO trainer glue and its before/after preference report mirror train.py.

The same stages as SFT (:mod:`qlora_kit.pipelines.train`): the recipe, output directory and
data are checked before the model loads, :func:`~qlora_kit.pipelines.builder.build_training_model`
assembles the model (its :class:`~qlora_kit.model.preference.PreferenceModel` wrapper scores
the answers on the fast path), the Trainer subclass that saves PEFT adapters trains it.
The losses are TRL's: DPO is ``DPOTrainer``'s own loss step, run on this trainer, whose
reference is the same model with its adapters switched off (or log-probabilities computed
once before training); ORPO is TRL's odds-ratio loss plus the NLL of the chosen answers.

Before and after training it reports, on the validation pairs, the preference loss, the
preference accuracy (share of pairs whose implicit reward is higher for the chosen answer:
DPO's ``beta * (log pi - log pi_ref)``, ORPO's ``beta * mean log pi``), the mean reward
margin and the share of pairs whose chosen answer is the likelier one; and on the test
split, exact match, as SFT does.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn
from tqdm.auto import tqdm

from qlora_kit.compat import dpo_loss_step, orpo_odds_ratio_loss
from qlora_kit.config import Recipe, RecipeError
from qlora_kit.model.adapters import (
    AdapterError,
    load_adapter_weights,
    lora_modules,
    read_adapter_config,
    set_lora_weights,
)
from qlora_kit.model.fsdp import full_tensor, is_sharded
from qlora_kit.model.preference import PreferenceModel
from qlora_kit.pipelines.evaluate import ExactMatchResult
from qlora_kit.pipelines.optim import full_precision_adapters
from qlora_kit.pipelines.train import (
    _trainer_class,
    build_run_model,
    eval_batch_size,
    evaluate,
    finish_run,
    plan_test,
    start_run,
    training_arguments,
)
from qlora_kit.preference_data import build_preference_datasets, preference_collator

log = logging.getLogger("qlora_kit")

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # the names TRL's loss and collator read


def check_adapters(recipe: Recipe) -> None:
    """The recipe's init and reference adapters exist and have the recipe's LoRA shape (before any model loads)."""
    lora = recipe.lora
    for key in ("preference.init_adapter", "preference.reference_adapter"):
        directory = getattr(recipe.preference, key.partition(".")[2])
        if directory is None:
            continue
        try:
            config = read_adapter_config(directory)
        except AdapterError as e:
            raise RecipeError(f"{key}: {e}") from None
        theirs = (config.get("r"), config.get("lora_alpha"), bool(config.get("use_rslora", False)))
        if theirs != (lora.r, lora.alpha, lora.use_rslora):
            raise RecipeError(
                f"{key}: {directory} was trained with r={theirs[0]}, alpha={theirs[1]}, use_rslora={theirs[2]}; "
                f"the recipe has lora.r={lora.r}, lora.alpha={lora.alpha}, lora.use_rslora={lora.use_rslora}: "
                "set the lora section to the adapter's values"
            )


def answer_logps(model: PreferenceModel, batch: dict, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's answer tokens and their count, policy or (``reference``) adapters off."""
    mask = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(mask == 0, -100)
    call = model.reference if reference else model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    out = call(**inputs) if reference else call(**inputs, stats=False)
    return out.log_probs.sum(1), mask[:, 1:].sum(1)


def _batches(dataset, collator, batch_size: int, device: torch.device, rows: list[int]):
    for start in range(0, len(rows), batch_size):
        batch = collator([dataset[i] for i in rows[start : start + batch_size]])
        yield {k: v.to(device) for k, v in batch.items()}


def with_reference_logps(
    model: PreferenceModel, dataset, collator, batch_size: int, device: torch.device, adapter: str | None = None
):
    """``dataset`` with the reference's summed answer log-probabilities in TRL's ``ref_*_logps`` columns.

    The reference is the base (adapters off) or, with ``adapter``, that adapter, loaded into the
    LoRA layers for this pass and replaced by the weights they held before. The processes share
    the rows and gather the results, except under FSDP, whose forwards run in step on every process.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    lm = model.lm
    rows = list(range(len(dataset)))
    if state.num_processes > 1 and not is_sharded(model):
        rows = rows[state.process_index :: state.num_processes]
    before = _lora_weights(lm) if adapter else None
    if adapter:
        with full_precision_adapters(lm):
            load_adapter_weights(lm, adapter)
    training = lm.training
    lm.eval()
    scores = []
    try:
        with torch.no_grad():
            starts = range(0, len(rows), batch_size)
            batches = _batches(dataset, collator, batch_size, device, rows)
            progress = tqdm(starts, desc="reference log-probs", unit="batch", disable=not state.is_main_process)
            for start, batch in zip(progress, batches):
                sums, _ = answer_logps(model, batch, reference=adapter is None)
                chosen, rejected = sums.float().cpu().chunk(2)
                scores += zip(rows[start : start + batch_size], chosen.tolist(), rejected.tolist())
    finally:
        lm.train(training)
        if before is not None:
            with full_precision_adapters(lm):
                set_lora_weights(lm, before, "the adapter weights before the reference pass")
    if state.num_processes > 1 and not is_sharded(model):
        scores = gather_object(scores)
    scores = sorted(dict((row, (c, r)) for row, c, r in scores).items())
    chosen, rejected = [c for _, (c, _) in scores], [r for _, (_, r) in scores]
    return dataset.add_column(REFERENCE_COLUMNS[0], chosen).add_column(REFERENCE_COLUMNS[1], rejected)


def _lora_weights(lm: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    with full_precision_adapters(lm):
        return {
            name: (full_tensor(m.lora_A.weight.detach()).clone(), full_tensor(m.lora_B.weight.detach()).clone())
            for name, m in lora_modules(lm).items()
        }


def preference_metrics(trainer, dataset, batch_size: int) -> dict:
    """The preference loss, accuracy, mean reward margin and the share of pairs whose chosen answer is likelier.

    One forward of the policy per batch: the trainer's loss step (TRL's) runs on it, and a hook
    on the model keeps its answer log-probabilities for the per-pair numbers; the reference's
    come from the dataset (:func:`with_reference_logps`). Every process scores every pair
    (validation sets are small; under FSDP the forwards must run in step).
    """
    model, beta = trainer.model, trainer.beta
    device = trainer.args.device
    captured = []
    hook = model.register_forward_hook(lambda module, inputs, out: captured.append(out.log_probs))
    training = model.training
    model.eval()
    loss_sum, chosen_reward, rejected_reward, likelier = 0.0, [], [], []
    try:
        with torch.no_grad():
            for batch in _batches(dataset, trainer.data_collator, batch_size, device, list(range(len(dataset)))):
                pairs = batch["input_ids"].shape[0] // 2
                loss_sum += trainer.compute_loss(model, batch).item() * pairs
                answer = batch["completion_mask"][:, 1:]
                sums = (captured.pop() * answer).sum(1).float()
                chosen, rejected = sums.chunk(2)
                if trainer.method == "orpo":  # TRL's ORPO reward: beta * the mean log-probability of the answer
                    counts = answer.sum(1).clamp(min=1)
                    chosen_reward.append(beta * chosen / counts[:pairs])
                    rejected_reward.append(beta * rejected / counts[pairs:])
                else:
                    ref_chosen, ref_rejected = (batch[c].float() for c in REFERENCE_COLUMNS)
                    chosen_reward.append(beta * (chosen - ref_chosen))
                    rejected_reward.append(beta * (rejected - ref_rejected))
                likelier.append(chosen > rejected)
    finally:
        hook.remove()
        model.train(training)
        trainer._metrics["eval"].clear()  # the loss step's own metrics: not for the next log line
    chosen_reward, rejected_reward = torch.cat(chosen_reward), torch.cat(rejected_reward)
    return {
        "val_loss": loss_sum / len(dataset),
        "pref_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
        "reward_margin": (chosen_reward - rejected_reward).mean().item(),
        "chosen_likelier": torch.cat(likelier).float().mean().item(),
    }


def _preference_trainer_class():
    QLoRATrainer = _trainer_class()

    class PreferenceTrainer(QLoRATrainer):
        """The QLoRA trainer (PEFT-format saving, FSDP checkpoints) with DPO's or ORPO's loss.

        For DPO it carries the settings TRL's DPO loss step reads (compat.DPO_LOSS_ATTRIBUTES)
        and runs that step itself; ORPO's loss is composed of TRL's odds-ratio loss here. Their
        metrics are averaged into each log line, as TRL's trainers do.
        """

        def __init__(self, *args, method: str, preference, nll_on_prompt: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            p = preference
            self.method, self.nll_on_prompt = method, nll_on_prompt
            self.beta, self.label_smoothing = p.beta, p.label_smoothing
            self.loss_types, self.loss_weights = p.losses()  # TRL sums the weighted losses
            self.f_divergence_type, self.f_alpha_divergence_coef = "reverse_kl", 1.0
            self.ld_alpha, self.use_weighting = None, False
            self.aux_loss_enabled, self.router_aux_loss_coef = False, 0.0
            self.precompute_ref_logps = False
            self.ref_model = self.model.reference
            self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
            self._total_train_tokens, self._tp_size = 0, 1

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.method == "orpo":
                return self._orpo_loss(model, inputs)
            # The reference comes from the batch where it carries it (the validation pairs always do).
            self.precompute_ref_logps = REFERENCE_COLUMNS[0] in inputs
            return dpo_loss_step()(self, model, inputs, return_outputs)

        def _orpo_loss(self, model, inputs) -> torch.Tensor:
            """ORPO (Hong et al. 2024): NLL of the chosen answers - beta * mean log sigmoid(log odds ratio).

            As in TRL's ORPOTrainer the log-probabilities are means over the answer tokens; the NLL
            covers the chosen answers (with data.train_on_prompt, their prompts too, as TRL's does).
            """
            completion, attention = inputs["completion_mask"], inputs["attention_mask"]
            chosen_rows = completion.shape[0] // 2
            scored = completion.clone()
            if self.nll_on_prompt:
                scored[:chosen_rows] = attention[:chosen_rows]
            labels = inputs["input_ids"].masked_fill(scored == 0, -100)
            out = model(input_ids=inputs["input_ids"], attention_mask=attention, labels=labels, fused_lm_head=True)
            answer = completion[:, 1:]
            mean_logps = (out.log_probs * answer).sum(1) / answer.sum(1).clamp(min=1)
            chosen, rejected = mean_logps.chunk(2)
            nll_mask = scored[:chosen_rows, 1:]
            nll = -(out.log_probs[:chosen_rows] * nll_mask).sum() / nll_mask.sum().clamp(min=1)
            losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = orpo_odds_ratio_loss()(
                self, chosen, rejected
            )
            mode = "train" if self.model.training else "eval"
            gather = self.accelerator.gather_for_metrics
            for name, value in (
                ("rewards/chosen", chosen_rewards),
                ("rewards/rejected", rejected_rewards),
                ("rewards/accuracies", (chosen_rewards > rejected_rewards).float()),
                ("rewards/margins", chosen_rewards - rejected_rewards),
                ("logps/chosen", chosen.detach()),
                ("logps/rejected", rejected.detach()),
                ("nll_loss", nll.detach()),
                ("log_odds_ratio", log_odds_ratio.detach()),
                ("log_odds_chosen", log_odds_chosen.detach()),
            ):
                self._metrics[mode][name].append(gather(value).float().mean().item())
            return nll - losses.mean()

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            mode = "train" if self.model.training else "eval"
            metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
            logs.update({f"eval_{key}": v for key, v in metrics.items()} if mode == "eval" else metrics)
            super().log(logs, start_time)
            self._metrics[mode].clear()

    return PreferenceTrainer


def train_preference(recipe: Recipe) -> dict:
    """Run a DPO or ORPO recipe end to end; returns the before/after metrics (also in ``metrics.json``)."""
    p, method = recipe.preference, recipe.training.method
    check_adapters(recipe)
    run = start_run(recipe)
    tokenizer, device = run.tokenizer, run.state.device
    data = build_preference_datasets(recipe.data, tokenizer, recipe.training.seed, p.max_prompt_len)
    log.info(
        "data: %d training pairs, %s validation pairs, %s test examples, %d skipped, %d dropped",
        len(data.train),
        len(data.validation) if data.validation is not None else 0,
        len(data.test or []),
        data.skipped,
        data.dropped,
    )
    test = plan_test(data, recipe, tokenizer)
    built = build_run_model(run, recipe, len(data.train))
    model, lm = built.model, built.lm
    if p.init_adapter:
        with full_precision_adapters(lm):
            load_adapter_weights(lm, p.init_adapter)
        log.info("the adapter starts from %s", p.init_adapter)
    collator = preference_collator(tokenizer)
    eval_batch = eval_batch_size(recipe)
    reference = p.reference_adapter or "the base with the adapters off"
    if method == "dpo" and (p.precompute_reference or p.reference_adapter):
        log.info("reference: %s; its log-probabilities computed once, before training", reference)
        data.train = with_reference_logps(model, data.train, collator, eval_batch, device, p.reference_adapter)
    elif method == "dpo":
        log.info("reference: %s, in every step", reference)
    if method == "dpo" and data.validation is not None:  # scored before, during and after training: once here
        data.validation = with_reference_logps(
            model, data.validation, collator, eval_batch, device, p.reference_adapter
        )

    trainer = _preference_trainer_class()(
        model=model,
        args=training_arguments(
            recipe,
            device,
            built.compute_dtype,
            data.validation is not None,
            eval_on_start=False,  # the validation numbers before training: measure() below
            sharded=run.fsdp is not None,
        ),
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=built.callbacks,
        optimizers=built.optimizers,
        adapter_config=built.adapter_config,
        method=method,
        preference=p,
        nll_on_prompt=recipe.data.train_on_prompt,
    )

    def measure() -> tuple[dict, ExactMatchResult | None]:
        metrics = preference_metrics(trainer, data.validation, eval_batch) if data.validation is not None else {}
        more, result = evaluate(trainer, lm, tokenizer, data, recipe, test, validation=False)
        return {**metrics, **more}, result

    before, before_test = measure() if run.resume_from is None else ({}, None)
    trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    after, after_test = measure()

    metrics = {"method": method, "before": before, "after": after, "train_steps": trainer.state.global_step}
    return finish_run(
        run, recipe, trainer, built, metrics, test, (before_test, after_test), preference_rows(method), width=24
    )


def preference_rows(method: str) -> tuple:
    """The rows a preference run's before/after table starts with (:func:`~qlora_kit.pipelines.train.format_metrics`)."""
    return (
        (f"{method} validation loss", "val_loss", "{:.4f}"),
        ("preference accuracy", "pref_accuracy", "{:.1%}"),
        ("reward margin", "reward_margin", "{:.3f}"),
        ("chosen likelier", "chosen_likelier", "{:.1%}"),
    )
