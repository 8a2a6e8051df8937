"""Switch a loaded Llama-family model to the fused RMSNorm, SwiGLU and RoPE ops.

:func:`use_fused_ops` changes modules of the model it is given, and only those:

- each ``<Family>RMSNorm`` (decoder layers' input and post-attention norms, the final norm,
  Qwen3's ``q_norm``/``k_norm``) gets a forward calling :func:`~qlora_kit.modules.fused_ops.rms_norm`;
- each ``<Family>MLP`` gets ``down_proj(swiglu(gate_proj(x), up_proj(x)))``, still calling its
  projection submodules (NF4, LoRA or plain linears);
- each ``<Family>Attention`` runs its stock forward with the fused rotary op switched on.

The forwards are set on the module instances (bound methods, so ``copy.deepcopy`` rebinds them
to the copy); the classes are untouched. Wrappers (DDP, accelerate's ``prepare``, our
``SFTModel``) can be applied before or after, and gradient checkpointing recomputes through the
same forwards. Apply it before accelerate's big-model dispatch hooks (``device_map``), not after:
the instance forward would replace the hooked one.

The rotary patch. transformers' attention forward calls ``apply_rotary_pos_emb``, a global of
its modeling module (``transformers.models.llama.modeling_llama`` etc.), so the fused op cannot
be reached through the module alone. That global is replaced, once per family and process, by
a dispatcher that calls the fused op only while the forward of an attention module switched by
:func:`use_fused_ops` is running (a ``ContextVar`` set around that forward: per thread, and set
again when gradient checkpointing recomputes the forward in the backward), and the original
function otherwise: unswitched models of the same family in the process compute exactly as before.

The mask patch. Before the layers, transformers' decoder forward makes the causal mask, and for
a batch without an attention mask it first reads the position ids on the GPU to find packed
sequences: a host sync in every training forward, after which the GPU waits for the host to
launch the layers. The ``create_causal_mask`` global is replaced the same way, by a dispatcher
that returns no mask (sdpa then runs plain causal attention, what transformers decides for such
a batch too) while :func:`causal_only` is on (the SFT loss's decoder forward over a batch the
collator gave neither an attention mask nor position ids: unpacked, right-padded rows) for a
model on sdpa attention, and calls the original otherwise.
"""

from __future__ import annotations

import functools
import logging
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import nn

from qlora_kit.compat import (
    MASK_CACHE_KEYWORDS,
    causal_mask_function,
    rotary_function,
    set_causal_mask_function,
    set_rotary_function,
)
from qlora_kit.kernels.dispatch import check_kernel
from qlora_kit.modules.fused_ops import apply_rotary, rms_norm, swiglu

log = logging.getLogger(__name__)

# transformers model type -> class-name prefix in transformers.models.<type>.modeling_<type>.
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_MODELING_PREFIXES = {f"transformers.models.{t}.modeling_{t}": prefix for t, prefix in FAMILIES.items()}
_SILU = ("silu", "swish")

# The kernel choice of the switched attention forward running now; None outside one.
_rotary_kernel: ContextVar[str | None] = ContextVar("qlora_kit_fused_rotary_kernel", default=None)
# Whether the decoder forward running now has a batch plain causal attention is right for.
_causal_only: ContextVar[bool] = ContextVar("qlora_kit_causal_only", default=False)


@contextmanager
def causal_only(on: bool = True) -> Iterator[None]:
    """Within the block (``on``), the decoder forward of a switched model makes no causal mask with sdpa
    attention: for a batch with neither an attention mask nor position ids (unpacked rows, right-padded:
    no token sees the pads after it), where transformers decides on none after a host sync."""
    token = _causal_only.set(on)
    try:
        yield
    finally:
        _causal_only.reset(token)


def _rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, kernel=self.fused_kernel)


def _mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), kernel=self.fused_kernel))


def _attention_forward(self, *args, **kwargs):
    token = _rotary_kernel.set(self.fused_kernel)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _rotary_kernel.reset(token)


_FORWARDS = {"RMSNorm": _rms_norm_forward, "MLP": _mlp_forward, "Attention": _attention_forward}


def _rotary_dispatcher(original):
    """An ``apply_rotary_pos_emb`` that is ``original`` except inside a switched attention forward."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        kernel = _rotary_kernel.get()
        # unsqueeze_dim=1 ([batch, heads, seq, head_dim]) is the layout every supported attention uses.
        if kernel is None or args or kwargs.get("unsqueeze_dim", 1) != 1:
            return original(q, k, cos, sin, *args, **kwargs)
        return apply_rotary(q, k, cos, sin, kernel=kernel)

    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


def _install_rotary_dispatcher(modeling: types.ModuleType) -> None:
    original = rotary_function(modeling)
    if not hasattr(original, "original"):
        set_rotary_function(modeling, _rotary_dispatcher(original))


def _mask_dispatcher(original):
    """A ``create_causal_mask`` that is ``original`` except under :func:`causal_only`, with sdpa attention."""

    @functools.wraps(original)
    def create_causal_mask(config, **kwargs):
        plain = kwargs.get("attention_mask") is None and all(kwargs.get(k) is None for k in MASK_CACHE_KEYWORDS)
        if _causal_only.get() and plain and config._attn_implementation == "sdpa":
            return None
        return original(config, **kwargs)

    create_causal_mask.original = original
    return create_causal_mask


def _install_mask_dispatcher(modeling: types.ModuleType) -> None:
    original = causal_mask_function(modeling)
    if original is not None and not hasattr(original, "original"):
        set_causal_mask_function(modeling, _mask_dispatcher(original))


def _role(module: nn.Module) -> str | None:
    """ "RMSNorm", "MLP" or "Attention" for those classes of a supported family's modeling module, else None."""
    cls = type(module)
    prefix = _MODELING_PREFIXES.get(cls.__module__)
    if prefix is None or not cls.__name__.startswith(prefix):
        return None
    role = cls.__name__[len(prefix) :]
    return role if role in _FORWARDS else None


def use_fused_ops(model: nn.Module, kernel: str = "auto") -> nn.Module:
    """Switch the RMSNorms, MLPs and rotary embeddings of a Llama-family model to the fused ops.

    Args:
        model: a llama, mistral, qwen2 or qwen3 transformers model (``...ForCausalLM`` or its
            base model), or any module holding one (DDP, ``SFTModel``).
        kernel: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``; see
            :mod:`qlora_kit.modules.fused_ops`.

    Returns:
        ``model`` itself. Calling it again only updates ``kernel``.

    Raises:
        ValueError: ``model`` holds no module of a supported family.
    """
    check_kernel(kernel)
    switched = dict.fromkeys(_FORWARDS, 0)
    for module in model.modules():
        role = _role(module)
        if role is None:
            continue
        if role == "MLP" and module.config.hidden_act not in _SILU:
            log.warning(
                "use_fused_ops: %s has hidden_act=%s, not SwiGLU: left as it is",
                type(module).__name__,
                module.config.hidden_act,
            )
            continue
        if role == "Attention":
            _install_rotary_dispatcher(sys.modules[type(module).__module__])
            _install_mask_dispatcher(sys.modules[type(module).__module__])
        module.fused_kernel = kernel
        module.forward = types.MethodType(_FORWARDS[role], module)
        switched[role] += 1
    if not any(switched.values()):
        raise ValueError(
            f"use_fused_ops: {type(model).__name__} holds no RMSNorm, MLP or attention module of a supported "
            f"family ({', '.join(FAMILIES)})"
        )
    log.info(
        "fused ops (%s kernel): %d RMSNorm, %d MLP, %d attention modules",
        kernel,
        switched["RMSNorm"],
        switched["MLP"],
        switched["Attention"],
    )
    return model
