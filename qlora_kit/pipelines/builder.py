"""The training model, assembled from a recipe: the one function train(), the benchmarks and the tests use.

    base (a checkpoint, streamed into NF4; or random NF4 weights of a config's shape)
      -> LoRA on the targeted linears (recipe.lora)
      -> QAT fake-quant (recipe.qat)
      -> fused ops, or the plain PyTorch path (training.fused_kernels)
      -> the base GEMMs in FP8 (training.fp8_base_matmul)
      -> the MLPs in chunks of tokens (training.mlp_chunk_tokens)
      -> gradient checkpointing, uncheckpointed layers, what the recompute leaves out (fused path),
         offloaded checkpoints (and attention outputs), embeddings
      -> optimizer inside backward, offloaded adapters (training.optimizer_in_backward, offload_adapters)
      -> SFTModel (the SFT loss) or PreferenceModel (DPO/ORPO log-probs: training.method), sharded under FSDP

Every switch is a recipe key, so a benchmark configured by recipe overrides measures
exactly what a user's recipe trains.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from qlora_kit.compat import checkpointed_layers, enable_checkpointing
from qlora_kit.config import Recipe, RecipeError
from qlora_kit.model.adapters import add_lora, peft_config
from qlora_kit.model.build import build_random_quantized
from qlora_kit.model.fsdp import nf4_storage_bytes, shard_model
from qlora_kit.model.fused import use_fused_ops
from qlora_kit.model.load import load_quantized, resolve_compute_dtype
from qlora_kit.model.offload import (
    checkpoint_host_bytes,
    host_memory_available,
    offload_embeddings,
    use_offloaded_checkpointing,
)
from qlora_kit.model.recompute import skip_unread_outputs
from qlora_kit.model.sft import SFTModel
from qlora_kit.model.sources import ModelSource
from qlora_kit.modules.fake_quant import FakeQuantConfig
from qlora_kit.modules.nf4_linear import use_fp8_matmuls
from qlora_kit.modules.qat_lora import enable_qat, set_qat_active
from qlora_kit.modules.tiled_mlp import use_tiled_mlp
from qlora_kit.pipelines.optim import optimizer_in_backward, optimizer_name

log = logging.getLogger("qlora_kit")


@dataclass
class TrainingModel:
    """What :func:`build_training_model` assembles.

    ``model`` is what the Trainer (or a benchmark's loop) trains: ``model(input_ids=..., labels=...)["loss"]``;
    ``lm`` the causal LM inside it. ``optimizers`` is the Trainer's ``optimizers=`` argument:
    the per-layer optimizers stepped inside backward, or ``(None, None)`` (the Trainer makes one).
    ``callbacks`` are Trainer callbacks the recipe needs (QAT's start step).
    """

    model: nn.Module  # SFTModel, or PreferenceModel for training.method dpo/orpo
    lm: nn.Module
    compute_dtype: torch.dtype
    adapter_config: dict
    optimizers: tuple = (None, None)
    callbacks: list = field(default_factory=list)


def build_training_model(
    recipe: Recipe,
    device: torch.device | str,
    *,
    source: ModelSource | None = None,
    random_config=None,
    random_seed: int = 0,
    total_steps: int | None = None,
    processes: int = 1,
    fsdp=None,
    progress: bool = True,
) -> TrainingModel:
    """Assemble the model ``recipe`` trains, on ``device``.

    Args:
        recipe: the model, quantization, lora, qat and training sections are read.
        source: the base checkpoint (:func:`~qlora_kit.model.sources.resolve_source`); or
        random_config: a transformers config whose shape gets random NF4 weights (benchmarks).
        random_seed: the seed of those weights. They stand for a checkpoint: training.seed (the
            adapters' initialisation, the data order) does not change them.
        total_steps: optimizer steps of the run, for the schedules of ``optimizer_in_backward``.
        processes: data-parallel processes (``optimizer_in_backward`` needs one).
        fsdp: accelerate's FSDP plugin (:func:`~qlora_kit.model.fsdp.fsdp_plugin_from_launch`) or None:
            with it, the model waits in CPU memory and is sharded over the processes.

    Raises:
        RecipeError: a combination of recipe keys this model cannot train with.
    """
    if (source is None) == (random_config is None):
        raise ValueError("pass exactly one of source and random_config")
    device = torch.device(device)
    t = recipe.training
    sharded = fsdp is not None
    _check(recipe, processes, sharded)
    compute_dtype = resolve_compute_dtype(recipe.model.compute_dtype, device)
    torch.manual_seed(t.seed)
    # Under FSDP the model waits in CPU memory until shard_model spreads it over the GPUs.
    keep_on = "cpu" if sharded else None
    if source is not None:
        lm = load_quantized(
            source,
            device=device,
            compute_dtype=compute_dtype,
            attn_implementation=recipe.model.attn_implementation,
            kernel=recipe.quantization.kernel,
            progress=progress,
            keep_on=keep_on,
        )
    else:
        lm = build_random_quantized(
            random_config, device, compute_dtype, recipe.model.attn_implementation, random_seed, progress, keep_on
        )
    lora = recipe.lora
    # training.fused_kernels false is the plain PyTorch path: plain LoRA autograd, stock ops, full-logits loss.
    add_lora(lm, lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.use_rslora, fused=t.fused_kernels)
    callbacks = _setup_qat(lm, recipe) if recipe.qat.enabled else []
    if t.fused_kernels:
        use_fused_ops(lm)
    if t.fp8_base_matmul:
        try:
            n = use_fp8_matmuls(lm, forward=t.fp8_base_matmul is True)
        except ValueError as e:
            raise RecipeError(f"training.fp8_base_matmul: {e}") from None
        where = "" if t.fp8_base_matmul is True else " in the backward pass (recompute, input gradients)"
        log.info("FP8 (e4m3) GEMMs%s for %d frozen NF4 weights", where, n)
        if device.type != "cuda":
            log.warning(
                "training.fp8_base_matmul on the %s: the e4m3 GEMMs are emulated in fp32 (for tests), "
                "slower than the full-precision path%s",
                device.type,
                ", generation most of all" if t.fp8_base_matmul is True else "",
            )
    if t.mlp_chunk_tokens:
        # After the fused ops: each chunk runs the MLP forward the model has by now.
        try:
            use_tiled_mlp(lm, t.mlp_chunk_tokens)
        except ValueError as e:
            raise RecipeError(f"training.mlp_chunk_tokens: {e}") from None
    lm.config.use_cache = False
    if t.gradient_checkpointing:
        enable_checkpointing(lm)
        for layer in lm.model.layers[max(len(lm.model.layers) - t.uncheckpointed_layers, 0) :]:
            layer.gradient_checkpointing = False
        if t.fused_kernels:
            skip_unread_outputs(lm)
        offload, keep_attention, keep_outputs = offload_choice(recipe, lm, device, compute_dtype, processes, sharded)
        if offload:
            try:
                layers = use_offloaded_checkpointing(lm, keep_attention, keep_outputs)
            except ValueError as e:  # e.g. uncheckpointed_layers covering every layer
                raise RecipeError(f"training.offload_activations: {e}") from None
            if t.offload_activations is True:  # auto has checked the host's memory already
                _check_host_memory(recipe, lm.config, layers, compute_dtype, processes, keep_attention, keep_outputs)
    if t.offload_embeddings:
        try:
            offload_embeddings(lm)
        except ValueError as e:
            raise RecipeError(f"training.offload_embeddings: {e}") from None
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s: %.2fM trainable parameters", lora.r, lora.target_modules, trainable / 1e6)

    adapter_config = peft_config(lm, lora.r, lora.alpha, lora.dropout, lora.use_rslora, recipe.model.name_or_path)
    optimizers = (None, None)
    if t.optimizer_in_backward:
        optimizers = _optimizer_in_backward(lm, recipe, device, total_steps)
    if t.method == "sft":
        model = SFTModel(lm, chunked_loss=t.fused_kernels)
    else:
        from qlora_kit.model.preference import PreferenceModel  # imports TRL, which SFT does not need

        model = PreferenceModel(lm, t.fused_kernels)
    if sharded:
        _shard(model, lm, processes, fsdp.reshard_after_forward)
    return TrainingModel(model, lm, compute_dtype, adapter_config, optimizers, callbacks)


def _check(recipe: Recipe, processes: int, sharded: bool) -> None:
    """Recipe combinations that cannot work, refused before any weight is loaded."""
    t = recipe.training
    if t.offload_activations is True and not t.gradient_checkpointing:
        raise RecipeError("training.offload_activations needs training.gradient_checkpointing: true")
    if t.offload_embeddings and sharded:
        raise RecipeError(
            "training.offload_embeddings does not work under FSDP, which shards the embeddings "
            "over the GPUs with the rest of the model: set it to false"
        )
    if t.fp8_base_matmul and recipe.qat.enabled:
        raise RecipeError(
            "training.fp8_base_matmul does not combine with qat: QAT fake-quantizes the full-precision "
            "base plus the adapter toward the export grid; set one of them to false"
        )
    if t.optimizer_in_backward and processes > 1:
        raise RecipeError(
            "training.optimizer_in_backward works in a single process: its hooks would step "
            "before the gradients of other processes are reduced"
        )


def offload_choice(
    recipe: Recipe, lm: nn.Module, device: torch.device, dtype: torch.dtype, processes: int, sharded: bool
) -> tuple[bool, bool, bool]:
    """Whether the checkpoints are offloaded, and with them the attention outputs and the q/k/v/o outputs.

    Set explicitly, as the recipe says. ``training.offload_activations: auto`` (the default): all three where
    they were measured to be the fastest and leanest setting (docs/performance.md): SFT on one CUDA GPU, the
    fused path, sdpa attention, and half the host's available memory holding them; else none of them.
    """
    t = recipe.training
    if t.offload_activations != "auto":
        return t.offload_activations, t.recompute_attention is False, t.recompute_projections is False
    keep_attention = (
        t.recompute_attention is not True
        and recipe.model.attn_implementation == "sdpa"
        and t.fp8_base_matmul != "backward"
    )
    keep_outputs = (
        t.recompute_projections is not True
        and t.fused_kernels
        and not recipe.qat.enabled
        and t.fp8_base_matmul != "backward"
    )
    layers = len(checkpointed_layers(lm))
    why = None
    if device.type != "cuda":
        why = f"training on {device.type}, not CUDA"
    elif t.method != "sft":
        why = f"training.method {t.method}"
    elif sharded or processes > 1:
        why = f"{processes} processes{', sharded' if sharded else ''}: measured on one GPU only"
    elif not layers:
        why = "no layer is checkpointed"
    else:
        need = _host_bytes(recipe, lm.config, layers, dtype, processes, keep_attention, keep_outputs)
        available = host_memory_available()
        if available is None or need > 0.5 * available:
            held = "an unknown amount" if available is None else f"{available / 1e9:.3g} GB"
            why = f"they need {need / 1e9:.3g} GB of pinned CPU memory, and the host has {held} available"
    if why is not None:
        log.info("training.offload_activations=auto: the checkpoints stay on the GPU (%s)", why)
        return False, False, False
    log.info(
        "training.offload_activations=auto: the checkpoints%s%s of %d layers wait in CPU memory (up to %.1f GB a step)",
        " with their attention outputs" if keep_attention else "",
        " and q/k/v/o outputs" if keep_outputs else "",
        layers,
        need / 1e9,
    )
    return True, keep_attention, keep_outputs


def _host_bytes(
    recipe: Recipe, config, layers: int, dtype: torch.dtype, processes: int, keep_attention: bool, keep_outputs: bool
) -> int:
    """The pinned CPU memory the offloaded checkpoints of this host's processes hold at the longest batch."""
    t = recipe.training
    rows = t.batch_size * t.sequences_per_row
    need = checkpoint_host_bytes(config, layers, rows * recipe.data.max_seq_len, dtype, keep_attention, keep_outputs)
    return need * min(processes, int(os.environ.get("LOCAL_WORLD_SIZE", processes)))  # the processes on this host


def _check_host_memory(
    recipe: Recipe, config, layers: int, dtype: torch.dtype, processes: int, keep_attention: bool, keep_outputs: bool
) -> None:
    """Refuse offloaded checkpoints the host's CPU memory cannot hold at the longest batch, before training:
    the alternative is the kernel killing the process mid-step (pinned memory cannot be swapped)."""
    t = recipe.training
    need = _host_bytes(recipe, config, layers, dtype, processes, keep_attention, keep_outputs)
    available = host_memory_available()
    log.info("offloaded checkpoints: up to %.1f GB of pinned CPU memory a step", need / 1e9)
    if available is None or need <= 0.9 * available:
        return
    kept = "".join(
        f" and {name}" for name, keep in (("attention outputs", keep_attention), ("projections", keep_outputs)) if keep
    )
    raise RecipeError(
        f"training.offload_activations: the checkpoints{kept} of {layers} layers need {need / 1e9:.3g} GB of CPU "
        f"memory at data.max_seq_len={recipe.data.max_seq_len} x training.batch_size={t.batch_size}"
        + (f" x {processes} processes" if processes > 1 else "")
        + f", and this machine has {available / 1e9:.3g} GB available: lower data.max_seq_len or "
        "training.batch_size"
        + (", or set training.recompute_attention and training.recompute_projections to true" if kept else "")
    )


def _setup_qat(lm: nn.Module, recipe: Recipe) -> list:
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


def _optimizer_in_backward(lm: nn.Module, recipe: Recipe, device: torch.device, total_steps: int | None) -> tuple:
    from transformers import get_scheduler

    t = recipe.training
    if total_steps is None:
        raise ValueError("training.optimizer_in_backward needs total_steps for its schedules")
    return optimizer_in_backward(
        lm,
        optimizer_name(t.optimizer, device),
        t.learning_rate,
        t.weight_decay,
        lambda opt: get_scheduler(t.lr_scheduler, opt, math.ceil(t.warmup_ratio * total_steps), total_steps),
        offload_adapters=t.offload_adapters,
    )


def _shard(model: SFTModel, lm: nn.Module, processes: int, reshard_after_forward: bool) -> None:
    from qlora_kit.compat import mark_prepared

    shard_model(model, lm.model.layers, reshard_after_forward)
    # accelerate runs FSDP on GPUs only; on the CPU (gloo) it would wrap the sharded model
    # in DDP. Marked as prepared, accelerate leaves it as it is on both.
    mark_prepared(model)
    local, total = nf4_storage_bytes(lm)
    log.info(
        "FSDP over %d processes: this one holds %.1f%% of the %.1f MB of NF4 weights",
        processes,
        100 * local / total,
        total / 2**20,
    )
