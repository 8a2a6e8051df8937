"""Causal flash attention whose backward runs from the forward pass's output, not a recomputed one.

Flash attention's backward needs q, k, v, the output O and the row logsumexp L of the
forward (FlashAttention-2, Dao 2023, Algorithm 2). Gradient checkpointing recomputes a layer's
forward in the backward pass, attention included, only to rebuild O and L: at long context that
recompute is the most expensive kernel of the layer (quadratic in the sequence, where the
projections are linear). :func:`flash_forward` returns O and L so the caller can keep them
(``qlora_kit.model.offload`` keeps them in CPU memory beside the checkpoint), and
:class:`AttentionFromKept` takes the recomputed q, k, v with the kept O and L: its forward
returns O as it is, its backward is the flash backward.

The kernels are torch's own: flash (``aten._scaled_dot_product_flash_attention``, and its CPU
twin) and cuDNN (``aten._scaled_dot_product_cudnn_attention``, CUDA). Training takes the kept path
only where ``scaled_dot_product_attention`` would itself run one of :data:`TRAINING_KERNELS`
(``torch._fused_sdp_choice``), so the lever never swaps in a slower kernel; elsewhere
:func:`supported` says no and the caller recomputes as before (on Hopper sdpa runs cuDNN, so the
kept path does too; ``scripts/bench_attention.py`` checks both kernels' kept backward against a
float64 reference and times them against sdpa's three passes). Layout as sdpa's:
q ``[batch, heads, seq, head_dim]``, k and v ``[batch, kv_heads, seq, head_dim]`` (grouped-query
attention when kv_heads divides heads); O is returned as ``[batch, seq, heads, head_dim]``, what
transformers' attention functions return.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

# What flash_forward's output carries besides O and L for the backward: the CUDA kernel, O's layout
# and the kernel's bookkeeping (cumulative and max sequence lengths, the dropout RNG state).
State = tuple
KERNELS = {
    int(getattr(SDPBackend, name)): name.lower()
    for name in ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
}


def sdpa_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> str:
    """The kernel sdpa would run for causal attention of these tensors: ``"flash_attention"``, ``"cudnn_attention"``..."""
    gqa = query.shape[1] != key.shape[1]
    choice = torch._fused_sdp_choice(query, key, value, None, 0.0, True, scale=scale, enable_gqa=gqa)
    return KERNELS.get(choice, str(choice))


# The kernels training keeps attention for (the sdpa choice they must match).
TRAINING_KERNELS = ("flash_attention", "cudnn_attention")


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> bool:
    """Whether sdpa would run one of :data:`TRAINING_KERNELS` for these tensors (the kept path then runs it too)."""
    if query.shape[1] % key.shape[1] or query.device.type not in ("cuda", "cpu"):
        return False
    return sdpa_kernel(query, key, value, scale) in TRAINING_KERNELS


def _expand_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    # The CPU kernel wants as many kv heads as query heads (the CUDA one groups them itself).
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def flash_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, kernel: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, State]:
    """Causal attention: (O ``[batch, seq, heads, head_dim]``, logsumexp L, the kernel's state).

    ``kernel``: ``"flash_attention"`` or ``"cudnn_attention"`` (CUDA); None: the one sdpa would run,
    if it is in :data:`TRAINING_KERNELS`, else flash.
    """
    if not query.is_cuda:
        groups = query.shape[1] // key.shape[1]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, _expand_heads(key, groups), _expand_heads(value, groups), 0.0, True, scale=scale
        )
        return out.transpose(1, 2).contiguous(), lse, ()
    if kernel is None:
        chosen = sdpa_kernel(query, key, value, scale)
        kernel = chosen if chosen in TRAINING_KERNELS else "flash_attention"
    if kernel == "cudnn_attention":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, True, False, scale=scale
        )
    else:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, True, False, scale=scale
        )
    # Flash writes O [b, s, h, d] and views it [b, h, s, d] (the transpose is free); cuDNN may lay it out as q.
    return out.transpose(1, 2).contiguous(), lse, (kernel, out.stride(), cum_q, cum_k, max_q, max_k, seed, offset)


def _with_strides(t: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    if t.stride() == strides:
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def _flash_backward(grad_out, query, key, value, out, lse, state: State, scale):
    """dq, dk, dv of causal attention from the forward's O and L (``out``, ``grad_out``: ``[b, h, s, d]``)."""
    if query.is_cuda:
        kernel, strides, cum_q, cum_k, max_q, max_k, seed, offset = state
        # O as the kernel wrote it, and its gradient in the same layout (cuDNN reads both with one layout).
        out, grad_out = (_with_strides(t, strides) for t in (out, grad_out))
        if kernel == "cudnn_attention":
            return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                grad_out, query, key, value, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True,
                scale=scale,
            )  # fmt: skip
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, query, key, value, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale
        )
    groups = query.shape[1] // key.shape[1]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, query, _expand_heads(key, groups), _expand_heads(value, groups), out, lse, 0.0, True, scale=scale
    )
    if groups > 1:  # the expanded heads' gradients add up into their kv head
        dk = dk.unflatten(1, (key.shape[1], groups)).sum(2)
        dv = dv.unflatten(1, (value.shape[1], groups)).sum(2)
    return dq, dk, dv


class AttentionFromKept(torch.autograd.Function):
    """Causal attention of (query, key, value) given its output and logsumexp from an earlier forward.

    Forward: returns ``out`` (``[batch, seq, heads, head_dim]``) unchanged, computing nothing.
    Backward: the flash backward, exact when query, key and value are those the kept output came from.
    """

    @staticmethod
    def forward(ctx, query, key, value, out, lse, state: State, scale: float | None):
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.state, ctx.scale = state, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        dq, dk, dv = _flash_backward(
            grad_out.contiguous().transpose(1, 2), query, key, value, out.transpose(1, 2), lse, ctx.state, ctx.scale
        )
        return dq, dk, dv, None, None, None, None
