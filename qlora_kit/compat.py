"""Every place qlora-kit relies on an upstream library's private or fast-moving internals.

Each coupling is one small function or constant here, and tests/test_compat.py checks the
upstream shape it assumes, so an upstream release that moves it fails one named test
instead of a training run. pyproject.toml bounds these packages to the majors tested;
constraints.txt pins the exact versions CI runs.

| coupling | upstream | used by |
|---|---|---|
| Trainer's private save/load hooks, checkpoint file names | transformers.Trainer | pipelines/train.py |
| the "already prepared" flag that makes ``Accelerator.prepare`` leave a model as it is | accelerate | pipelines/builder.py (FSDP) |
| the per-layer ``_gradient_checkpointing_func``; checkpointing's enabling method (renamed for v6) | transformers GradientCheckpointingLayer, PreTrainedModel | model/offload.py, pipelines/builder.py |
| ``LayerWiseDummyOptimizer`` for optimizers stepped inside backward | transformers.trainer_pt_utils | pipelines/optim.py |
| the 8-bit optimizers' per-tensor step pieces | bitsandbytes Optimizer8bit | pipelines/optim.py |
| the module global ``apply_rotary_pos_emb`` the attention forward calls | transformers modeling_<family> | model/fused.py |
| the module global ``create_causal_mask`` the decoder's forward calls, with keyword arguments | transformers modeling_<family> | model/fused.py |
| the ``"sdpa"`` entry of the attention functions the attention forward looks up | transformers ALL_ATTENTION_FUNCTIONS | model/offload.py |
| the flash and cuDNN attention kernels and their backward, ``aten._scaled_dot_product_{flash,cudnn}_attention*``; sdpa's kernel choice ``torch._fused_sdp_choice`` | torch | modules/flash_attention.py |
| the GGUF name map and tensor processors | transformers.modeling_gguf_pytorch_utils | model/sources.py |
| DPOTrainer's loss step and the trainer attributes it reads; ORPOTrainer's odds-ratio loss | trl | pipelines/preference.py |
| the autotuner's chosen config; a compiled kernel's launch | triton Autotuner, CompiledKernel | kernels/nf4.py |
| the FP8 GEMM with rowwise scales, ``torch._scaled_mm`` | torch | quant/fp8.py |
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable

import torch
from torch import nn

# transformers.Trainer methods the QLoRA trainer overrides (mostly private: not a documented API).
TRAINER_HOOKS = (
    "_save",
    "_load_from_checkpoint",
    "_save_optimizer_and_scheduler",
    "_load_optimizer_and_scheduler",
    "_load_rng_state",
    "_save_checkpoint",
    "get_optimizer_cls_and_kwargs",
)

# The module global transformers' attention forwards call for rotary embeddings.
ROTARY_GLOBAL = "apply_rotary_pos_emb"
# The module global transformers' decoder forwards call for the causal mask (keyword arguments), and the
# names its KV cache argument has had (transformers 5.17: past_key_values; 5.24: cache).
MASK_GLOBAL = "create_causal_mask"
MASK_CACHE_KEYWORDS = ("past_key_values", "cache")

# Optimizer8bit methods and attributes a step without per-tensor synchronizations calls.
BNB_STEP_PARTS = ("initialized", "check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step")


def check_trainer_hooks(trainer_class: type) -> type:
    """Fail at once, naming the method, if transformers' Trainer no longer has a hook ``trainer_class`` overrides."""
    from transformers import Trainer

    missing = [name for name in TRAINER_HOOKS if name in vars(trainer_class) and not hasattr(Trainer, name)]
    if missing:
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__}'s Trainer has no {missing}: this qlora-kit supports the "
            "transformers versions pyproject.toml allows (constraints.txt: the tested one)"
        )
    return trainer_class


def checkpoint_file_names() -> tuple[str, str]:
    """The Trainer's optimizer and scheduler file names inside ``checkpoint-N/``."""
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

    return OPTIMIZER_NAME, SCHEDULER_NAME


def mark_prepared(model: nn.Module) -> None:
    """Make ``Accelerator.prepare`` (and so the Trainer) leave ``model`` as it is (no DDP/FSDP wrapping)."""
    model._is_accelerate_prepared = True


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing on every decoder layer of a transformers model: through
    ``activation_checkpointing_enable`` where transformers has it, else the older name it deprecates
    (``gradient_checkpointing_enable``, to be removed in v6)."""
    options = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and "activation_checkpointing_kwargs" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of ``model`` that gradient checkpointing recomputes (not the model holding them)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def set_checkpoint_function(layer: nn.Module, checkpoint: Callable) -> None:
    """Replace the function a checkpointed decoder layer recomputes through: ``checkpoint(run, *inputs)``."""
    if not hasattr(layer, "_gradient_checkpointing_func"):
        raise RuntimeError(
            f"{type(layer).__name__} has no _gradient_checkpointing_func: enable gradient checkpointing first, "
            "or this transformers version checkpoints layers differently"
        )
    layer._gradient_checkpointing_func = checkpoint


def sdpa_attention_function() -> Callable:
    """transformers' ``"sdpa"`` attention function, as the attention forwards look it up now."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def set_sdpa_attention_function(fn: Callable) -> None:
    """Make ``fn`` the ``"sdpa"`` attention function every transformers attention forward calls."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS["sdpa"] = fn


def layerwise_dummy_optimizer(optimizer_dict: dict, lr: float) -> torch.optim.Optimizer:
    """The Trainer's stand-in optimizer for optimizers that step inside backward (it steps nothing itself)."""
    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

    return LayerWiseDummyOptimizer(optimizer_dict=optimizer_dict, lr=lr)


def bnb_step_without_syncs(optimizer: torch.optim.Optimizer) -> None:
    """bitsandbytes' ``Optimizer8bit.step`` without its ``torch.cuda.synchronize()`` after every tensor.

    Inside backward those synchronizations drain the GPU's queue once per tensor, and the
    GPU then waits for the CPU to queue the next kernels. The update kernels and whatever
    reads the weights afterwards run in stream order, so they are not needed on the GPU
    (the paged state is prefetched on the same device).
    """
    if not optimizer.initialized:
        optimizer.check_overrides()
        optimizer.to_gpu()
        optimizer.initialized = True
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if len(optimizer.state[p]) == 0:
                optimizer.init_state(group, p, gindex, pindex)
            optimizer.prefetch_state(p)
            optimizer.update_step(group, p, gindex, pindex)


def rotary_function(modeling: types.ModuleType) -> Callable:
    """The ``apply_rotary_pos_emb`` global of a transformers modeling module."""
    if not hasattr(modeling, ROTARY_GLOBAL):
        raise NotImplementedError(
            f"{modeling.__name__} has no {ROTARY_GLOBAL}: this transformers version applies rotary "
            "embeddings differently, and use_fused_ops does not support it"
        )
    return getattr(modeling, ROTARY_GLOBAL)


def set_rotary_function(modeling: types.ModuleType, fn: Callable) -> None:
    """Replace the ``apply_rotary_pos_emb`` global the modeling module's attention forward calls."""
    setattr(modeling, ROTARY_GLOBAL, fn)


def causal_mask_function(modeling: types.ModuleType) -> Callable | None:
    """The ``create_causal_mask`` global of a transformers modeling module (None where it has none)."""
    return getattr(modeling, MASK_GLOBAL, None)


def set_causal_mask_function(modeling: types.ModuleType, fn: Callable) -> None:
    """Replace the ``create_causal_mask`` global the modeling module's decoder forward calls."""
    setattr(modeling, MASK_GLOBAL, fn)


def gguf_tensor_mapping():
    """transformers' GGUF helpers: ``(TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field)``."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    return TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field


# What triton's CompiledKernel launcher takes before the kernel's own arguments, as JITFunction.run
# and CompiledKernel's runner pass them (read from triton 3.6 and 3.9; tests/test_compat.py checks it).
COMPILED_KERNEL_LAUNCH = (
    "grid_0",
    "grid_1",
    "grid_2",
    "stream",
    "function",
    "packed_metadata",
    "launch_metadata",
    "launch_enter_hook",
    "launch_exit_hook",
)


def triton_best_config(autotuner):
    """The ``triton.Config`` a ``triton.autotune`` wrapper ran last, or None when this triton does not record it."""
    return getattr(autotuner, "best_config", None)


def _launch_hooks_set(runtime) -> bool:
    # Hook chains (triton 3.5+) are never None: their list of calls says whether a profiler is attached.
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(exit_, "calls", exit_))


def triton_compiled_launcher(kernel, grid: tuple[int, ...]) -> Callable[..., None] | None:
    """A launch of triton's compiled ``kernel`` (what ``JITFunction.warmup`` returns) on ``grid``, with
    none of the JIT's per-call argument binding, specialization and cache lookup.

    Call it with every argument of the JIT function, constexprs included, in order; the caller
    guarantees they are what the kernel was compiled for (dtypes, 16-byte alignment, the
    specialized integers) and that the device current when it was made is current. It launches
    on the current stream, so it is captured by a CUDA graph. While a launch hook is set (a
    profiler), it goes through the compiled kernel's own runner, which builds the launch metadata.
    None when this triton's compiled kernel lacks the interface: launch the JIT function normally.
    """
    import triton
    from triton.runtime.driver import driver

    if hasattr(kernel, "result"):  # a kernel compiled asynchronously
        kernel = kernel.result()
    try:
        run = kernel.run  # loads the module the first time
        function, metadata = kernel.function, kernel.packed_metadata
    except AttributeError:
        return None
    if not callable(run) or function is None:
        return None
    device = driver.active.get_current_device()
    stream_of = driver.active.get_current_stream
    runtime = triton.knobs.runtime
    grid_0, grid_1, grid_2 = (*grid, 1, 1)[:3]

    def launch(*args) -> None:
        if _launch_hooks_set(runtime):
            kernel[(grid_0, grid_1, grid_2)](*args)
        else:
            run(grid_0, grid_1, grid_2, stream_of(device), function, metadata, None, None, None, *args)

    return launch


# The attributes of its trainer that TRL's DPOTrainer._compute_loss reads (tests/test_preference.py checks the list).
DPO_LOSS_ATTRIBUTES = (
    "accelerator",
    "aux_loss_enabled",
    "beta",
    "f_alpha_divergence_coef",
    "f_divergence_type",
    "label_smoothing",
    "ld_alpha",
    "loss_types",
    "loss_weights",
    "model",
    "precompute_ref_logps",
    "ref_model",
    "router_aux_loss_coef",
    "use_weighting",
    "_metrics",
    "_total_train_tokens",
    "_tp_size",
)


def dpo_loss_step() -> Callable:
    """TRL's ``DPOTrainer._compute_loss(trainer, model, inputs, return_outputs)``: the DPO losses and their metrics.

    It reads the settings in :data:`DPO_LOSS_ATTRIBUTES` off ``trainer``, calls ``model`` (and
    ``trainer.ref_model``) as a model with TRL's fused LM head, and appends its metrics to
    ``trainer._metrics``.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    return DPOTrainer._compute_loss


def orpo_odds_ratio_loss() -> Callable:
    """TRL's ``ORPOTrainer.odds_ratio_loss(trainer, chosen_logps, rejected_logps)``; reads ``trainer.beta`` and
    ``trainer.accelerator``; returns (losses, chosen rewards, rejected rewards, mean log-sigmoid odds ratio,
    mean log odds)."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    return ORPOTrainer.odds_ratio_loss


def in_backward() -> bool:
    """Whether autograd is running a backward pass right now (a checkpoint's recompute runs inside one).

    torch's private graph-task id, the test ``torch.utils.checkpoint`` itself makes: -1 outside backward.
    """
    return torch._C._current_graph_task_id() != -1


def scaled_mm(
    a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``(scale_a * a) @ (scale_b * b)`` for e4m3 ``a`` [M, K] (row-major) and ``b`` [K, N] (column-major),
    with fp32 ``scale_a`` [M, 1] and ``scale_b`` [1, N]: torch's private FP8 GEMM (cuBLAS / CUTLASS) on CUDA.

    Elsewhere the same arithmetic in fp32 (products of e4m3 values are exact there, sums in fp32):
    CPU builds of torch differ in which scalings they take (2.11 only per-tensor ones).
    """
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)
