"""Optimizers: the recipe's choice, and the optimizer step fused into the backward pass.

With ``optimizer_in_backward`` each trainable tensor gets its own optimizer, stepped by a
hook as soon as its gradient is complete, after which the gradient is freed: the LoRA
gradients of the whole model never exist at once (3.2 GB for a 65B model at r=64). The
Trainer sees transformers' layer-wise dummy optimizer and builds one scheduler per tensor.
Gradient clipping does not apply (no global norm exists), and gradient accumulation is
not possible (each micro-batch would step).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

_PAGED = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit")


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


def optimizer_in_backward(model: nn.Module, name: str, lr: float, weight_decay: float):
    """One optimizer per trainable tensor, stepped from its post-accumulate-grad hook.

    ``name`` is a Trainer optimizer name (see :func:`optimizer_name`). Returns the dummy
    optimizer to hand to the Trainer (``optimizers=(dummy, None)``).
    """
    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

    cls = _optimizer_class(name)
    optimizers = {p: cls([p], lr=lr, weight_decay=weight_decay) for p in model.parameters() if p.requires_grad}

    def step(param: torch.Tensor) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad(set_to_none=True)

    for param in optimizers:
        param.register_post_accumulate_grad_hook(step)
    return LayerWiseDummyOptimizer(optimizer_dict=optimizers, lr=lr)
