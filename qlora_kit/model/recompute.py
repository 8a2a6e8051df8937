"""What a checkpointed decoder layer's recompute can leave out.

Gradient checkpointing runs a layer's forward again in backward to rebuild what the layer's
backward reads; the recomputed layer output itself is read by nothing (backward only follows
its graph). A linear whose output reaches nothing but the layer's output, as a Llama MLP's
``down_proj`` (``out = h + down_proj(...)``), therefore need not be computed there: its base
GEMM, over a quarter of an 8B layer's projection FLOPs, is skipped in every recompute, and
its backward (the input gradient, the LoRA gradients) is unchanged. Which linears qualify is
the family's :attr:`~qlora_kit.model.plans.LayerPlan.recompute_unread`.
"""

from __future__ import annotations

from torch import nn

from qlora_kit.compat import checkpointed_layers
from qlora_kit.model.plans import layer_plan
from qlora_kit.modules.lora import NF4LoRALinear
from qlora_kit.modules.nf4_linear import NF4Linear


def skip_unread_outputs(lm: nn.Module) -> int:
    """Mark the linears of every checkpointed decoder layer of ``lm`` whose output its recompute
    never reads, so that the recompute leaves it uncomputed; returns how many were marked.

    Call after checkpointing is set up (layers left uncheckpointed are not marked). Only NF4
    layers (with or without LoRA) know the mark.
    """
    plan = layer_plan(lm.config.model_type)
    marked = 0
    for layer in checkpointed_layers(lm):
        for name in plan.recompute_unread:
            module = layer.get_submodule(name)
            if isinstance(module, (NF4LoRALinear, NF4Linear)):
                module.output_unread_in_recompute = True
                marked += 1
    return marked
