"""Optimizers: the recipe's choice, and the optimizer step fused into the backward pass.

With ``optimizer_in_backward`` the trainable tensors are grouped by decoder layer, each
group has its own optimizer, and a hook steps it as soon as the last gradient of the
group is complete, then frees the group's gradients: the LoRA gradients of the whole
model never exist at once (3.2 GB for a 65B model at r=64), and the optimizer runs once
per layer rather than once per tensor. Each group's learning-rate scheduler steps right
after its optimizer; the Trainer gets transformers' layer-wise dummy optimizer and
scheduler. Gradient clipping does not apply (no global norm exists), and gradient
accumulation is not possible (each micro-batch steps).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

_PAGED = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit")
_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")


def optimizer_name(name: str, device: torch.device) -> str:
    """The Trainer's optimizer: bitsandbytes' paged/8-bit AdamW on CUDA, torch AdamW elsewhere."""
    if name in _PAGED and device.type != "cuda":
        log.info("optimizer %s needs CUDA; using torch AdamW on %s", name, device.type)
        return "adamw_torch"
    return "adamw_torch" if name == "adamw" else name


def _optimizer_class(name: str):
    if name == "adamw_torch":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    return {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
            "adamw_8bit": bnb.optim.AdamW8bit}[name]  # fmt: skip


def _groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Trainable tensors grouped by decoder layer (one group each for tensors outside the layers)."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            match = _LAYER.match(name)
            groups.setdefault(match.group(1) if match else name, []).append(p)
    return list(groups.values())


def optimizer_in_backward(
    model: nn.Module, name: str, lr: float, weight_decay: float,
    schedule: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
):  # fmt: skip
    """One optimizer (and scheduler, from ``schedule(optimizer)``) per decoder layer's trainable tensors.

    ``name`` is a Trainer optimizer name (see :func:`optimizer_name`). The optimizer and
    then the scheduler step from a gradient hook once the group's last gradient of a
    backward pass is complete. Returns ``(optimizer, scheduler)`` dummies for the Trainer
    (``optimizers=...``); the optimizer's ``optimizer_dict`` holds the group optimizers.
    """
    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

    cls = _optimizer_class(name)
    optimizer_dict = {}
    for group in _groups(model):
        optimizer = cls(group, lr=lr, weight_decay=weight_decay)
        scheduler = schedule(optimizer) if schedule else None
        pending = {"left": len(group)}

        def step(_param, optimizer=optimizer, scheduler=scheduler, pending=pending, size=len(group)):
            pending["left"] -= 1
            if pending["left"] == 0:  # the group's last gradient of this backward pass
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
                pending["left"] = size

        for p in group:
            p.register_post_accumulate_grad_hook(step)
        optimizer_dict[group[0]] = optimizer
    dummy = LayerWiseDummyOptimizer(optimizer_dict=optimizer_dict, lr=lr)
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
