"""The mark a checkpointed layer's recompute reads: a module whose output nothing reads there.

Gradient checkpointing runs a layer's forward again inside backward only to rebuild what the
layer's backward reads; the recomputed layer output itself is read by nothing. A module whose
output reaches nothing but that output (``qlora_kit.model.recompute`` marks them from each
family's plan) may leave it uncomputed there: its autograd graph, what its backward saves, is
all the recompute needs. Modules that can do so carry the attribute, False until marked.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_kit.compat import in_backward

MARK = "output_unread_in_recompute"


def output_unread(module: nn.Module) -> bool:
    """Whether this call of ``module`` may leave its output uncomputed: ``module`` is marked and runs in a
    recompute (inside backward, with gradients on), where only its autograd graph is used."""
    return getattr(module, MARK, False) and torch.is_grad_enabled() and in_backward()
