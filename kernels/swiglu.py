"""Triton kernels for the SwiGLU gate (Shazeer 2020) of Llama's MLP, forward and backward.

``h = silu(g) * u`` with ``silu(g) = g * sigmoid(g)``, where ``g = gate_proj(x)`` and
``u = up_proj(x)``. The stock module runs ``silu`` and the multiply as two kernels and keeps
``silu(g)`` for the backward; here one elementwise pass reads g and u and writes h, with
silu in fp32 in registers and one rounding to the output dtype, and the backward recomputes
silu from g:

    du = dh * silu(g)
    dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))

Both kernels are flat 1-D passes over the elements, memory bound: bf16 reads 4 bytes and
writes 2 per element forward, reads 6 and writes 4 backward.
"""

from __future__ import annotations

import torch

from qlora_kit.kernels._triton import DTYPES as _DTYPES
from qlora_kit.kernels._triton import INTERPRET as _INTERPRET
from qlora_kit.kernels._triton import available, tl, triton  # noqa: F401 (available is re-exported)

_BLOCK = 4096  # elements per program: 16 per thread at 8 warps, two 16-byte vectors of bf16
_WARPS = 8


if triton is not None:
    from qlora_kit.kernels.rmsnorm import round_to

    @triton.jit
    def _swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        # 64-bit tile base: an MLP activation may exceed 2^31 elements.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + offs, round_to(h, h_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(
        dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr, BF16_BY_BITS: tl.constexpr
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(dh_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask).to(tl.float32)
        sig = tl.sigmoid(g)
        du = dh * g * sig
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(dg_ptr + offs, round_to(dg, dg_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)
        tl.store(du_ptr + offs, round_to(du, du_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    _check(a.dtype in _DTYPES and b.dtype in _DTYPES, f"{name}: expected bf16/fp16/fp32, got {a.dtype}, {b.dtype}")
    _check(
        a.shape == b.shape and a.device == b.device,
        f"{name}: expected one shape and device, got {tuple(a.shape)} on {a.device} and {tuple(b.shape)} on {b.device}",
    )


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` computed in fp32, rounded once to ``promote_types(g.dtype, u.dtype)``.

    Args:
        g: the gate projection, any shape, bf16/fp16/fp32.
        u: the up projection, g's shape and device.
    """
    _check_pair("g, u", g, u)
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
    n = g.numel()
    _swiglu_forward_kernel[(triton.cdiv(n, _BLOCK),)](
        g, u, h, n, BLOCK=_BLOCK, BF16_BY_BITS=_INTERPRET, num_warps=_WARPS
    )
    return h


def swiglu_backward(grad_h: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`swiglu_forward` from its inputs, silu recomputed from ``g``.

    Returns:
        ``(grad_g, grad_u)`` in g's and u's dtypes.
    """
    _check_pair("g, u", g, u)
    _check_pair("grad_h, g", grad_h, g)
    grad_h, g, u = grad_h.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    _swiglu_backward_kernel[(triton.cdiv(n, _BLOCK),)](
        grad_h, g, u, dg, du, n, BLOCK=_BLOCK, BF16_BY_BITS=_INTERPRET, num_warps=_WARPS
    )
    return dg, du
