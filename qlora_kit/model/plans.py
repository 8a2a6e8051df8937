"""Per-family decoder layer plans: which linears a layer has, GPTQ's order, AWQ's scaling groups.

A plan is data, keyed by the transformers ``model_type``, as AutoAWQ's
``get_layers_for_scaling`` is per model class: supporting a new family in the merger is one
entry in :data:`PLANS`, not edits in the driver or the quantizers. Names are relative to one
decoder layer (``model.layers.<i>.``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qlora_kit.errors import UserInputError


class LayerPlanError(UserInputError):
    """A model family the merger has no layer plan for, or a decoder layer that does not match its plan."""


@dataclass(frozen=True)
class AWQGroup:
    """Linears that read the output of ``prev`` (a norm or a linear), scaled together by AWQ.

    ``inspect`` is the block whose output the scale search compares; it holds the linears and
    its input is theirs.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer of a family.

    ``gptq_sequence``: GPTQ's true-sequential order, groups of linears that read the same input;
    every linear of the layer is in exactly one group. ``awq_groups``: AWQ's scaling groups,
    again every linear once. ``awq_no_clip``: linears AWQ's clipping search leaves alone.
    ``recompute_unread``: modules (linears, or a block holding some) whose output reaches nothing
    but the layer's output (through the residual sum), so a checkpointed layer's recompute in
    backward, which builds their autograd graph and never reads the layer's output, need not
    compute it. ``recompute_kept``: linears whose outputs a checkpointed layer's forward can keep for
    its recompute (``training.recompute_projections: false``), the attention's: an 8B layer's q, k, v
    and o outputs are 20 KB a token, the MLP's gate and up outputs 56 KB.
    """

    gptq_sequence: tuple[tuple[str, ...], ...]
    awq_groups: tuple[AWQGroup, ...]
    awq_no_clip: tuple[str, ...] = ()
    recompute_unread: tuple[str, ...] = ()
    recompute_kept: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        linears = sorted(self.linears)
        if len(set(linears)) != len(linears):
            raise ValueError(f"a linear appears in two GPTQ groups: {linears}")
        if sorted(n for g in self.awq_groups for n in g.linears) != linears:
            raise ValueError("the AWQ groups must hold every linear of the GPTQ sequence exactly once")
        if not set(self.awq_no_clip) <= set(linears):
            raise ValueError(f"awq_no_clip {self.awq_no_clip} names linears outside the layer")
        blocks = {name.rpartition(".")[0] for name in linears} - {""}
        if not set(self.recompute_unread) <= set(linears) | blocks:
            raise ValueError(f"recompute_unread {self.recompute_unread} names modules outside the layer")
        if not set(self.recompute_kept) <= set(linears) - set(self.recompute_unread):
            raise ValueError(
                f"recompute_kept {self.recompute_kept} names modules that are not linears read in the recompute"
            )

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of the layer, in GPTQ's order."""
        return tuple(name for group in self.gptq_sequence for name in group)

    def check(self, layer: nn.Module, model_type: str) -> None:
        """Refuse a decoder layer whose linears are not the plan's."""
        found = {name for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        if found != set(self.linears):
            raise LayerPlanError(
                f"{model_type} decoder layers hold linears {sorted(found)}; its layer plan knows {sorted(self.linears)}"
            )


_ATTENTION_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")

LLAMA = LayerPlan(
    gptq_sequence=(_ATTENTION_IN, ("self_attn.o_proj",), _MLP_IN, ("mlp.down_proj",)),
    awq_groups=(
        AWQGroup("input_layernorm", _ATTENTION_IN, "self_attn"),
        # Under grouped-query attention v's output is narrower than o's input: the group is skipped.
        AWQGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        AWQGroup("post_attention_layernorm", _MLP_IN, "mlp"),
        AWQGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    awq_no_clip=("self_attn.q_proj", "self_attn.k_proj"),  # q.k^T amplifies clipping errors
    recompute_unread=("mlp", "mlp.down_proj"),  # out = h + mlp(norm(h)): nothing after the MLP reads it
    recompute_kept=(*_ATTENTION_IN, "self_attn.o_proj"),
)

# Mistral, Qwen2 and Qwen3 layers have Llama's linears: Qwen2's q/k/v carry biases (AWQ folds 1/s
# into v's bias as into its weight); Qwen3's q_norm/k_norm act on q's and k's outputs, not linears.
PLANS: dict[str, LayerPlan] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA}


def layer_plan(model_type: str) -> LayerPlan:
    """The plan of a transformers ``model_type``; a clear error for a family without one."""
    if model_type not in PLANS:
        raise LayerPlanError(
            f"merge has no decoder layer plan for model type '{model_type}' (qlora_kit/model/plans.py); "
            f"families with one: {', '.join(PLANS)}"
        )
    return PLANS[model_type]
