"""RMSNorm, SwiGLU and rotary embeddings as fused autograd ops (Triton kernels, manual backward).

Each op has a plain-torch reference written as the transformers code it replaces
(``LlamaRMSNorm.forward``, ``act_fn(gate) * up``, ``apply_rotary_pos_emb``); the reference is
what runs off CUDA and what the tests compare the kernels against. The fused ops save less
for the backward than autograd does for the reference: RMSNorm keeps x and one fp32 rstd per
row, SwiGLU keeps g and u (not silu(g)), RoPE keeps cos and sin only.

``kernel`` selects the implementation: ``"auto"`` (Triton on CUDA, torch elsewhere),
``"triton"`` (also on CPU tensors under ``TRITON_INTERPRET=1``, for tests) or ``"torch"``
(:mod:`qlora_kit.kernels.dispatch`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from qlora_kit.kernels.dispatch import use_triton

# The torch references: transformers' code, op for op (so the CPU path is the stock model's numerics).


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm.forward``."""
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(input_dtype)


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``act_fn(gate_proj(x)) * up_proj(x)`` of transformers' ``LlamaMLP`` with ``hidden_act="silu"``."""
    return F.silu(g) * u


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` of the two halves of the last dim, as transformers writes it."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (``unsqueeze_dim=1``)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# The fused ops. Everything the backward needs goes through save_for_backward, so non-reentrant
# gradient checkpointing can drop and recompute it. The kernel modules are imported on first use:
# triton reads TRITON_INTERPRET when they are imported, and the torch path never needs triton.


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from qlora_kit.kernels.rmsnorm import rms_norm_forward

        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        from qlora_kit.kernels.rmsnorm import rms_norm_backward

        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = rms_norm_backward(grad_y, x, weight, rstd, weight_grad=ctx.needs_input_grad[1])
        return grad_x, grad_weight, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        from qlora_kit.kernels.swiglu import swiglu_forward

        ctx.save_for_backward(g, u)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        from qlora_kit.kernels.swiglu import swiglu_backward

        return swiglu_backward(grad_h, *ctx.saved_tensors)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        from qlora_kit.kernels.rope import rope_forward

        ctx.save_for_backward(cos, sin)
        ctx.dtypes = q.dtype, k.dtype
        return rope_forward(q, cos, sin), rope_forward(k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        from qlora_kit.kernels.rope import rope_backward

        cos, sin = ctx.saved_tensors
        q_dtype, k_dtype = ctx.dtypes
        dq = rope_backward(grad_q, cos, sin, q_dtype) if ctx.needs_input_grad[0] else None
        dk = rope_backward(grad_k, cos, sin, k_dtype) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel: str = "auto") -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)``, computed in fp32, as ``LlamaRMSNorm``.

    The output has ``promote_types(x.dtype, weight.dtype)``. The weight's gradient is computed
    only when it requires one (in QLoRA it is frozen).
    """
    if use_triton(kernel, x):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def swiglu(g: torch.Tensor, u: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """``silu(g) * u``; the kernel computes silu in fp32 and rounds once to ``promote_types(g, u)``."""
    if use_triton(kernel, g):
        return _SwiGLU.apply(g, u)
    return swiglu_reference(g, u)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)``: ``x * cos + rotate_half(x) * sin`` for q and k.

    q, k: ``[batch, heads, seq, head_dim]`` (k may have fewer heads); cos, sin:
    ``[batch or 1, seq, head_dim]``. Outputs have the dtype torch gives (``promote_types`` of
    x, cos and sin). The kernel gives no gradient to cos and sin (transformers computes them
    under no_grad): when either requires one, the reference runs.
    """
    if use_triton(kernel, q) and not (cos.requires_grad or sin.requires_grad):
        return _Rotary.apply(q, k, cos, sin)
    return apply_rotary_reference(q, k, cos, sin)
