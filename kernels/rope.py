"""Triton kernel for rotary position embeddings (Su et al. 2021) in transformers' layout.

transformers applies RoPE as ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x2, x1)`` (x1, x2 the two halves of the head dim), on
``x = [batch, heads, seq, head_dim]`` and ``cos, sin = [batch or 1, seq, head_dim]``:
a concatenation, a negation, two multiplies and an add, each a kernel with its own
temporary. Per pair of halves it is a rotation,

    out1 = x1 * cos1 - x2 * sin1        out2 = x2 * cos2 + x1 * sin2

and its backward is the transposed rotation,

    dx1 = g1 * cos1 + g2 * sin2         dx2 = g2 * cos2 - g1 * sin1

which the same kernel computes (``TRANSPOSE``). One program takes one (batch, head) and a
block of positions, reads x and the matching rows of cos and sin, and writes the output in
fp32 math with one rounding. The output keeps x's memory layout (transformers' q and k are
transposed views of [batch, seq, heads, head_dim] projections), as torch's elementwise ops do.
"""

from __future__ import annotations

import torch

from qlora_kit.kernels._triton import DTYPES as _DTYPES
from qlora_kit.kernels._triton import INTERPRET as _INTERPRET
from qlora_kit.kernels._triton import available, tl, triton  # noqa: F401 (available is re-exported)

_TILE = 4096  # elements per program: 32 positions of head_dim 128
_WARPS = 4


if triton is not None:
    from qlora_kit.kernels.rmsnorm import round_to

    @triton.jit
    def _rope_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        n_heads,
        seq_len,
        half,
        stride_xb,
        stride_xh,
        stride_xs,
        stride_ob,
        stride_oh,
        stride_os,
        stride_cb,
        stride_cs,
        stride_sb,
        stride_ss,
        BLOCK_S: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        TRANSPOSE: tl.constexpr,
        BF16_BY_BITS: tl.constexpr,
    ):
        # 64-bit (batch, head) bases; positions times their stride stay within one batch element.
        b = (tl.program_id(0) // n_heads).to(tl.int64)
        h = (tl.program_id(0) % n_heads).to(tl.int64)
        pos = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)[:, None]
        d = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (pos < seq_len) & (d < half)

        x1_ptrs = x_ptr + b * stride_xb + h * stride_xh + pos * stride_xs + d
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + half, mask=mask, other=0.0).to(tl.float32)
        cos_ptrs = cos_ptr + b * stride_cb + pos * stride_cs + d
        cos1 = tl.load(cos_ptrs, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptrs + half, mask=mask, other=0.0).to(tl.float32)
        sin_ptrs = sin_ptr + b * stride_sb + pos * stride_ss + d
        sin1 = tl.load(sin_ptrs, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptrs + half, mask=mask, other=0.0).to(tl.float32)

        if TRANSPOSE:
            out1 = x1 * cos1 + x2 * sin2
            out2 = x2 * cos2 - x1 * sin1
        else:
            out1 = x1 * cos1 - x2 * sin1
            out2 = x2 * cos2 + x1 * sin2
        out_ptrs = out_ptr + b * stride_ob + h * stride_oh + pos * stride_os + d
        tl.store(out_ptrs, round_to(out1, out_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)
        tl.store(out_ptrs + half, round_to(out2, out_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype, transpose: bool) -> torch.Tensor:
    _check(x.dim() == 4, f"expected [batch, heads, seq, head_dim], got shape {tuple(x.shape)}")
    batch, heads, seq, head_dim = x.shape
    _check(head_dim % 2 == 0, f"head_dim must be even, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        _check(
            t.dim() == 3 and t.shape[0] in (1, batch) and t.shape[1:] == (seq, head_dim),
            f"{name}: expected [1 or {batch}, {seq}, {head_dim}], got {tuple(t.shape)}",
        )
        _check(t.device == x.device, f"{name} is on {t.device}, x on {x.device}")
    _check(
        x.dtype in _DTYPES and cos.dtype in _DTYPES and sin.dtype in _DTYPES and dtype in _DTYPES,
        f"expected bf16/fp16/fp32, got x {x.dtype}, cos {cos.dtype}, sin {sin.dtype}, output {dtype}",
    )
    # Any strides but a unit one along head_dim; a batch of 1 in cos/sin broadcasts (stride 0).
    x, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, cos, sin))
    cos, sin = cos.expand(batch, seq, head_dim), sin.expand(batch, seq, head_dim)
    out = torch.empty_like(x, dtype=dtype)
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_s = max(1, _TILE // (2 * block_half))
    _rope_kernel[(batch * heads, triton.cdiv(seq, block_s))](
        x,
        cos,
        sin,
        out,
        heads,
        seq,
        half,
        *x.stride()[:3],
        *out.stride()[:3],
        *cos.stride()[:2],
        *sin.stride()[:2],
        BLOCK_S=block_s,
        BLOCK_HALF=block_half,
        TRANSPOSE=transpose,
        BF16_BY_BITS=_INTERPRET,
        num_warps=_WARPS,
    )
    return out


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in one pass.

    Args:
        x: ``[batch, heads, seq, head_dim]`` (any strides), bf16/fp16/fp32.
        cos, sin: ``[batch or 1, seq, head_dim]``.

    Returns:
        The rotated ``x`` in ``promote_types`` of the three dtypes (as torch computes it),
        with x's memory layout.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    return _rotate(x, cos, sin, dtype, transpose=False)


def rope_backward(grad_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of :func:`rope_forward` with respect to x: the transposed rotation.

    Args:
        grad_out: the output's gradient, ``[batch, heads, seq, head_dim]``.
        cos, sin: as in the forward.
        dtype: x's dtype, the gradient's.
    """
    return _rotate(grad_out, cos, sin, dtype, transpose=True)
