"""Outputs a checkpointed layer's forward keeps, for its recompute to take instead of computing them again.

Gradient checkpointing runs a layer's forward twice: once without gradients, and again inside
backward (the recompute) to rebuild what the layer's backward reads. A linear whose output is
small for its cost, as the attention's q, k, v and o projections (20 KB a token of an 8B layer
for a fifth of its GEMM work), can instead hand the recompute the forward's output: the
checkpoint (:mod:`qlora_kit.model.offload`) opens a :class:`KeptOutputs` for the layer's
forward and again for its recompute; a marked module puts its output there in the forward and
takes it back, in the same call order, in the recompute, where it runs only what its backward
saves. Modules that can do so carry the attribute :data:`MARK`, False until marked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

MARK = "output_kept_in_checkpoint"


class KeptOutputs:
    """The outputs one checkpointed layer's forward kept, in call order.

    ``hold(y)`` stores one (the offloaded checkpoint: in CPU memory) and returns an object whose
    ``take()`` gives it back; ``held`` are those objects, for the checkpoint to prefetch.
    """

    def __init__(self, hold: Callable[[torch.Tensor], Any]) -> None:
        self.hold = hold
        self.held: list[Any] = []
        self.replaying = False

    def keep(self, y: torch.Tensor) -> None:
        self.held.append(self.hold(y))

    def take(self) -> torch.Tensor:
        return self.held.pop(0).take()


_open: ContextVar[KeptOutputs | None] = ContextVar("qlora_kit_kept_outputs", default=None)


@contextmanager
def keeping(kept: KeptOutputs | None) -> Iterator[None]:
    """Within the block (a checkpointed layer's forward, or its recompute once ``kept.replaying``), marked
    modules keep their outputs in ``kept``, or take them from it."""
    token = _open.set(kept)
    try:
        yield
    finally:
        _open.reset(token)


def kept_output(module: nn.Module) -> torch.Tensor | None:
    """In a marked module's recompute, the output its forward kept; None where it computes its output."""
    kept = _open.get()
    if kept is None or not kept.replaying or not getattr(module, MARK, False):
        return None
    return kept.take()


def keep_output(module: nn.Module, y: torch.Tensor) -> None:
    """In a marked module's checkpointed forward, keep ``y`` for the recompute."""
    kept = _open.get()
    if kept is not None and not kept.replaying and getattr(module, MARK, False):
        kept.keep(y)
