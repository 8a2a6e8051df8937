"""What a checkpointed decoder layer's recompute can leave out.

Gradient checkpointing runs a layer's forward again in backward to rebuild what the layer's
backward reads; the recomputed layer output itself is read by nothing (backward only follows
its graph). A module whose output reaches nothing but the layer's output, as a Llama MLP and
its ``down_proj`` (``out = h + mlp(...)``), therefore need not compute it there
(:mod:`qlora_kit.modules.unread`): ``down_proj``'s base GEMM, over a quarter of an 8B layer's
projection FLOPs, is skipped in every recompute; a tiled MLP skips its whole forward there (its
backward recomputes each chunk itself). Backward (the input gradient, the LoRA gradients) is
unchanged. Which modules qualify is the family's
:attr:`~qlora_kit.model.plans.LayerPlan.recompute_unread`.
"""

from __future__ import annotations

from torch import nn

from qlora_kit.compat import checkpointed_layers
from qlora_kit.model.plans import layer_plan
from qlora_kit.modules import kept, unread


def skip_unread_outputs(lm: nn.Module) -> int:
    """Mark the modules of every checkpointed decoder layer of ``lm`` whose output its recompute
    never reads, so that the recompute leaves it uncomputed; returns how many were marked.

    Call after checkpointing and the tiled MLP are set up (layers left uncheckpointed are not
    marked). Only modules that know the mark get it: NF4 linears (with or without LoRA) and
    tiled MLPs.
    """
    return _mark(lm, layer_plan(lm.config.model_type).recompute_unread, unread.MARK)


def keep_outputs(lm: nn.Module) -> int:
    """Mark the linears of every checkpointed decoder layer of ``lm`` whose outputs the family's plan keeps
    (:attr:`~qlora_kit.model.plans.LayerPlan.recompute_kept`), so that an offloaded checkpoint keeps them
    for the recompute (:mod:`qlora_kit.modules.kept`); returns how many were marked (NF4 linears, with or
    without LoRA, know the mark)."""
    return _mark(lm, layer_plan(lm.config.model_type).recompute_kept, kept.MARK)


def _mark(lm: nn.Module, names: tuple[str, ...], mark: str) -> int:
    marked = 0
    for layer in checkpointed_layers(lm):
        for name in names:
            module = layer.get_submodule(name)
            if hasattr(module, mark):
                setattr(module, mark, True)
                marked += 1
    return marked
