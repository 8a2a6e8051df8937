"""Optimizers: the recipe's choice, and the optimizer step fused into the backward pass.

With ``optimizer_in_backward`` the trainable tensors are grouped by decoder layer, each
group has its own optimizer, and a hook steps it as soon as the last gradient of the
group is complete, then frees the group's gradients: the LoRA gradients of the whole
model never exist at once (3.2 GB for a 65B model at r=64), and the optimizer runs once
per layer rather than once per tensor. Each group's learning-rate scheduler steps right
after its optimizer; the Trainer gets transformers' layer-wise dummy optimizer and
scheduler. Gradient clipping does not apply (no global norm exists), and gradient
accumulation is not possible (each micro-batch steps).

With ``offload_adapters`` the LoRA weights live in CPU memory as fp32 masters and come to
the GPU in bfloat16 only while their decoder layer runs (:class:`OffloadedAdapters`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qlora_kit.compat import bnb_step_without_syncs, layerwise_dummy_optimizer

log = logging.getLogger(__name__)

_PAGED = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit")
_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")


def optimizer_name(name: str, device: torch.device, sharded: bool = False) -> str:
    """The Trainer's optimizer: bitsandbytes' paged/8-bit AdamW on CUDA, torch AdamW elsewhere.

    ``sharded``: under FSDP, where the parameters are DTensors, which bitsandbytes' optimizers
    cannot step; torch AdamW's state is sharded like the parameters.
    """
    if name in _PAGED and device.type != "cuda":
        log.info("optimizer %s needs CUDA; using torch AdamW on %s", name, device.type)
        return "adamw_torch"
    if name in _PAGED and sharded:
        log.info(
            "optimizer %s cannot step FSDP's sharded parameters; using torch AdamW (its state is sharded too)", name
        )
        return "adamw_torch"
    return "adamw_torch" if name == "adamw" else name


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class of an :func:`optimizer_name` (bitsandbytes' through :func:`without_syncs`)."""
    if name == "adamw_torch":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    return without_syncs(
        {
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
            "adamw_8bit": bnb.optim.AdamW8bit,
        }[name]
    )


class _StepWithoutSyncs:
    """A bitsandbytes optimizer whose step does not synchronize (:func:`qlora_kit.compat.bnb_step_without_syncs`)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        bnb_step_without_syncs(self)
        return loss


_WITHOUT_SYNCS: dict[type, type] = {}


def without_syncs(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` itself, or for a bitsandbytes optimizer its subclass that steps without synchronizing.

    bitsandbytes synchronizes the GPU after every tensor's update (448 times a step for an 8B
    model's LoRA): each forward then starts from an empty GPU queue and runs as fast as the host
    can launch it. Without the syncs the host queues the next step while this one still runs.
    """
    from bitsandbytes.optim.optimizer import Optimizer8bit

    if not issubclass(cls, Optimizer8bit):
        return cls
    if cls not in _WITHOUT_SYNCS:
        _WITHOUT_SYNCS[cls] = type(cls.__name__, (_StepWithoutSyncs, cls), {"__module__": __name__})
    return _WITHOUT_SYNCS[cls]


def _groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable tensors grouped by decoder layer, keyed by the layer's path ("": tensors outside the layers)."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            match = _LAYER.match(name)
            groups.setdefault(match.group(1) if match else "", []).append(p)
    return groups


class OffloadedAdapters:
    """One decoder layer's adapters kept in CPU memory, on the GPU only while the layer runs.

    Each fp32 master weight is stored as two 16-bit halves in (pinned) CPU memory: its
    high half, which is a bfloat16 (the fp32 value truncated), and its low half. While the
    layer runs, the parameter holds the high half on the GPU, uploaded by a forward
    pre-hook: that is what the bf16 matmuls use. A forward run without gradients (the
    first pass of offloaded checkpointing, evaluation) drops it again afterwards; the
    recomputation in backward keeps it until :meth:`step`, which reassembles the exact
    fp32 master on the GPU one tensor at a time, steps the optimizer on it, sends both
    halves back and drops the GPU copy. The copies run in stream order, without a host
    sync. For a 65B model at r=64 this keeps the GPU free of the 3.2 GB of fp32 LoRA
    weights, at 8 bytes per LoRA weight per step over PCIe.
    """

    def __init__(self, layer: nn.Module, params: list[nn.Parameter]) -> None:
        self.params = params
        for p in params:
            if p.dtype != torch.float32:
                raise ValueError(f"offloaded adapters need fp32 trainable tensors, got {p.dtype}")
            p._offload_device = p.device
            p._high = torch.empty(p.shape, dtype=torch.bfloat16, pin_memory=p.is_cuda)
            p._low = torch.empty(p.shape, dtype=torch.int16, pin_memory=p.is_cuda)
            _store(p, p.data)
            _drop(p)
        # Stand-ins the optimizer keys its state by: they hold an fp32 master during a step.
        self.masters = [nn.Parameter(torch.empty(0, device=p._offload_device)) for p in params]
        layer.register_forward_pre_hook(lambda module, args: self.bring())
        layer.register_forward_hook(lambda module, args, out: None if torch.is_grad_enabled() else self.drop())

    def bring(self) -> None:
        """Upload the high halves for the layer's forward pass."""
        for p in self.params:
            if p.numel() == 0:
                p.data = p._high.to(p._offload_device, non_blocking=True)

    def drop(self) -> None:
        for p in self.params:
            _drop(p)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer`` (built on :attr:`masters`) on the reassembled fp32 masters; frees the gradients."""
        for p, m in zip(self.params, self.masters):
            if p.grad is None:
                continue
            low = p._low.to(p._offload_device, non_blocking=True)
            m.data, m.grad = _join(p.data, low), p.grad.float()
            p.grad = None
            optimizer.step()
            _store(p, m.data)
            m.data, m.grad = torch.empty(0, device=p._offload_device), None
            _drop(p)


def _split(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = w.float().view(torch.int32)
    # Narrowing int32 -> int16 keeps the low 16 bits; the arithmetic shift keeps the sign.
    return (bits >> 16).to(torch.int16).view(torch.bfloat16), bits.to(torch.int16)


def _join(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return ((high.view(torch.int16).to(torch.int32) << 16) | (low.to(torch.int32) & 0xFFFF)).view(torch.float32)


def _store(p: nn.Parameter, master: torch.Tensor) -> None:
    high, low = _split(master)
    p._high.copy_(high, non_blocking=True)
    p._low.copy_(low, non_blocking=True)


def _drop(p: nn.Parameter) -> None:
    p.data = torch.empty(0, dtype=torch.bfloat16, device=p._offload_device)


@contextmanager
def full_precision_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block, offloaded adapters hold their fp32 masters (on the CPU), to save or load them.

    On leaving, the (possibly changed) values are stored as halves again and the GPU copies dropped.
    """
    offloaded = [p for p in model.parameters() if hasattr(p, "_high")]
    if offloaded and offloaded[0]._offload_device.type == "cuda":
        torch.cuda.synchronize()  # the halves' copies from the GPU are asynchronous
    for p in offloaded:
        p.data = _join(p._high, p._low)
    try:
        yield
    finally:
        for p in offloaded:
            _store(p, p.data)
            _drop(p)


def optimizer_in_backward(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    schedule: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
    offload_adapters: bool = False,
):
    """One optimizer (and scheduler, from ``schedule(optimizer)``) per decoder layer's trainable tensors.

    ``name`` is a Trainer optimizer name (see :func:`optimizer_name`). The optimizer and
    then the scheduler step from a gradient hook once the group's last gradient of a
    backward pass is complete. ``offload_adapters``: each decoder layer's trainable tensors
    live in CPU memory and come to the GPU while the layer runs (:class:`OffloadedAdapters`). Returns
    ``(optimizer, scheduler)`` dummies for the Trainer (``optimizers=...``); the
    optimizer's ``optimizer_dict`` holds the group optimizers.
    """
    cls = optimizer_class(name)
    optimizer_dict = {}
    for layer, group in _groups(model).items():
        offloaded = OffloadedAdapters(model.get_submodule(layer), group) if offload_adapters and layer else None
        optimizer = cls(offloaded.masters if offloaded else group, lr=lr, weight_decay=weight_decay)
        scheduler = schedule(optimizer) if schedule else None
        size = len(group)
        pending = {"left": size}

        def step(_param, optimizer=optimizer, scheduler=scheduler, pending=pending, size=size, offloaded=offloaded):
            pending["left"] -= 1
            if pending["left"] == 0:  # the group's last gradient of this backward pass
                if offloaded is None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    offloaded.step(optimizer)
                if scheduler is not None:
                    scheduler.step()
                pending["left"] = size

        for p in group:
            p.register_post_accumulate_grad_hook(step)
        optimizer_dict[group[0]] = optimizer
    dummy = layerwise_dummy_optimizer(optimizer_dict, lr)
    return dummy, _HookedSchedules(list(optimizer_dict.values()))


class _HookedSchedules(torch.optim.lr_scheduler.LRScheduler):
    """The scheduler the Trainer steps: a no-op (the groups' schedulers step in the hooks) that reports their lr."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def step(self, epoch=None) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [self.optimizers[0].param_groups[0]["lr"]]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
