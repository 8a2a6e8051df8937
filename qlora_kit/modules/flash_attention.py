"""Causal flash attention whose backward runs from the forward pass's output, not a recomputed one.

Flash attention's backward needs q, k, v, the output O and the row logsumexp L of the
forward (FlashAttention-2, Dao 2023, Algorithm 2). Gradient checkpointing recomputes a layer's
forward in the backward pass, attention included, only to rebuild O and L: at long context that
recompute is the most expensive kernel of the layer (quadratic in the sequence, where the
projections are linear). :func:`flash_forward` returns O and L so the caller can keep them
(``qlora_kit.model.offload`` keeps them in CPU memory beside the checkpoint), and
:class:`AttentionFromKept` takes the recomputed q, k, v with the kept O and L: its forward
returns O as it is, its backward is the flash backward.

The kernels are torch's flash kernels (``aten._scaled_dot_product_flash_attention`` on CUDA,
its CPU twin elsewhere), taken only where ``scaled_dot_product_attention`` would run flash itself
(``torch._fused_sdp_choice``): where it picks another kernel, as cuDNN on Hopper, :func:`supported`
says no and the caller recomputes as before, so the lever never swaps in a slower kernel (on an
H200 sdpa's cuDNN kernel runs the three passes in less time than flash runs two). Layout as sdpa's:
q ``[batch, heads, seq, head_dim]``, k and v ``[batch, kv_heads, seq, head_dim]`` (grouped-query
attention when kv_heads divides heads); O is returned as ``[batch, seq, heads, head_dim]``, what
transformers' attention functions return.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

# What flash_forward's output carries besides O and L for the backward: the CUDA kernel's
# bookkeeping (cumulative and max sequence lengths, the dropout RNG state).
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


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> bool:
    """Whether sdpa would run the flash kernel for these tensors (then the kept path runs the same kernel)."""
    if query.shape[1] % key.shape[1] or query.device.type not in ("cuda", "cpu"):
        return False
    return sdpa_kernel(query, key, value, scale) == "flash_attention"


def _expand_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    # The CPU kernel wants as many kv heads as query heads (the CUDA one groups them itself).
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def flash_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor, State]:
    """Causal attention: (O ``[batch, seq, heads, head_dim]``, logsumexp L, the kernel's state)."""
    if query.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, True, False, scale=scale
        )
        # Written [b, s, h, d] and viewed [b, h, s, d]: the transpose is free.
        return out.transpose(1, 2).contiguous(), lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    groups = query.shape[1] // key.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, _expand_heads(key, groups), _expand_heads(value, groups), 0.0, True, scale=scale
    )
    return out.transpose(1, 2).contiguous(), lse, ()


def _flash_backward(grad_out, query, key, value, out, lse, state: State, scale):
    """dq, dk, dv of causal attention from the forward's O and L (``out``, ``grad_out``: ``[b, h, s, d]``)."""
    if query.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = state
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
