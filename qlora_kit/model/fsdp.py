"""Fully sharded data parallel (FSDP2) for the NF4 + LoRA model: every process holds 1/N of the weights.

Under DDP every GPU holds the whole NF4 model. Under FSDP each of N processes keeps 1/N of
every parameter, the frozen NF4 weights included, and gathers one decoder layer at a time
for its forward and its backward. :func:`shard_model` turns each :class:`NF4Linear`'s
buffers into frozen parameters of raw bytes (FSDP shards parameters only), then applies
torch's ``fully_shard`` to every decoder layer and to the root module, which keeps the
rest (embeddings, final norm, lm_head).

No mixed-precision policy: the model computes in its own dtypes exactly as on one GPU
(NF4Linear and LoRA cast to ``compute_dtype``), FSDP moves the NF4 bytes untouched and
reduces the fp32 LoRA gradients in fp32.

Every process must build the same model (same weights, same seed for the LoRA
initialisation): ``fully_shard`` keeps each process's own slice, it broadcasts nothing.
Collectives (gathering full tensors for saving) must be called by every process in the
same order; :func:`full_tensor` and :func:`full_optimizer_state` say so.

``accelerate launch`` with an FSDP config (``fsdp_version: 2``) asks for this mode:
:func:`fsdp_plugin_from_launch` reads and checks its settings. The model is sharded
before the Trainer sees it, and accelerate leaves an already sharded model as it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from qlora_kit.errors import UserInputError
from qlora_kit.modules.nf4_linear import NF4_STORAGE, NF4Linear


class FSDPConfigError(UserInputError):
    """An accelerate FSDP setting qlora-kit does not support; the message says what to set."""


def fsdp_plugin_from_launch():
    """The FSDP settings ``accelerate launch`` gave this process, checked; ``None`` when it asked for no FSDP.

    Read from the environment as the Trainer's accelerator reads them (on the CPU too,
    where accelerate itself runs no FSDP).
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise FSDPConfigError(
            f"accelerate config: qlora-kit shards with FSDP2, set fsdp_version: 2 (got {plugin.fsdp_version})"
        )
    if plugin.activation_checkpointing:
        raise FSDPConfigError(
            "accelerate config: set fsdp_activation_checkpointing: false; the recipe's "
            "training.gradient_checkpointing checkpoints the decoder layers"
        )
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise FSDPConfigError("accelerate config: fsdp_offload_params: true is not supported, set it to false")
    return plugin


def shard_model(
    model: nn.Module,
    layers: Iterable[nn.Module],
    reshard_after_forward: bool = True,
    quant_storage: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: one FSDP unit per decoder layer, the rest in the root's.

    ``layers``: the decoder layers (``lm.model.layers``), with their LoRA already added.
    Parameters move to the current device (CUDA, or the CPU under gloo) layer by layer as
    they are sharded, so a model loaded into CPU memory never exists whole on a GPU.
    ``reshard_after_forward``: free each gathered layer after its forward (and gather it
    again for backward); ``False`` keeps it until backward, faster and less memory-frugal.
    ``quant_storage``: the dtype the NF4 bytes are stored as (see :class:`NF4Linear`): a
    floating dtype, because FSDP2 (torch 2.11) first wraps every shard in a parameter that
    requires grad, which an integer tensor cannot; no mixed-precision policy is applied,
    so nothing casts it and the bytes move untouched. Returns ``model``.
    """
    for m in model.modules():
        if isinstance(m, NF4Linear):
            m.set_quant_storage(quant_storage)
    no_casts = MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, mp_policy=no_casts)
    # The root's weights are needed again right at the start of backward (lm_head): keep them gathered.
    fully_shard(model, reshard_after_forward=False, mp_policy=no_casts)
    if hasattr(model, "generate"):
        # Generation runs outside forward(): let FSDP gather the root's weights around it too.
        register_fsdp_forward_method(model, "generate")
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`shard_model` (or another ``fully_shard``)."""
    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter or state (a collective: every process must call it); else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor as the slice this process keeps of ``like``, when ``like`` is sharded and of its
    shape; else ``value`` itself. Every process holds ``value``: no communication."""
    if isinstance(like, DTensor) and value.shape == like.shape:
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return value


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state gathered whole, on the CPU: the file one GPU writes.

    A collective: every process must call it.
    """
    state_dict = optimizer.state_dict()
    state = {
        i: {k: full_tensor(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for i, s in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def shard_optimizer_state(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of :func:`full_optimizer_state` for ``optimizer`` over sharded parameters: each process keeps its slice."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {
        i: {k: shard_like(v, params[i]) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for i, s in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def nf4_storage_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of NF4 weight storage held by this process, and in the whole model (equal unless sharded)."""
    local = total = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            for name in NF4_STORAGE:
                t = getattr(m, name)
                local += (t.to_local() if isinstance(t, DTensor) else t).nbytes
                total += t.numel() * t.element_size()
    return local, total
