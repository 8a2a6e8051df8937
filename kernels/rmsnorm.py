"""Triton kernels for RMSNorm (Zhang & Sennrich 2019) as Llama computes it, forward and backward.

Per row of ``x``: ``rstd = 1 / sqrt(mean(x^2) + eps)``, ``y = w * round_x(x * rstd)``, in fp32,
where ``round_x`` rounds to x's dtype: transformers' ``LlamaRMSNorm`` casts the normalized row
back to the input dtype *before* the weight multiply, and the forward keeps that rounding.
``y`` has ``promote_types(x.dtype, w.dtype)``, as ``w * x`` does in torch.

Both kernels take one row per program, the whole row in one block (hidden sizes up to
``MAX_COLS``), so a row is read once and reduced in registers; the backward reads x, dy and the
saved per-row ``rstd`` and never the forward's output. The weight gradient (a reduction over
rows) is computed only when asked: in QLoRA the norm weights are frozen.

Also here: :func:`round_to`, the fp32 -> storage-dtype rounding the fused kernels share.
"""

from __future__ import annotations

import torch

from qlora_kit.kernels._triton import DTYPES as _DTYPES
from qlora_kit.kernels._triton import INTERPRET as _INTERPRET
from qlora_kit.kernels._triton import available, tl, triton  # noqa: F401 (available is re-exported)

MAX_COLS = 16384  # the widest row one program holds in registers (Llama-family hidden sizes are <= 8192)
_DW_PROGRAMS_PER_SM = 4  # programs of the weight-gradient backward, each summing a slab of rows
_INTERPRET_SMS = 1  # no SMs under the interpreter: 4 programs, so tests still split the rows


if triton is not None:

    @triton.jit
    def round_to(x, dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        """fp32 ``x`` rounded to nearest even in ``dtype``.

        BF16_BY_BITS: round on the bits, for the interpreter, whose fp32 -> bf16 cast truncates
        (on the GPU the plain cast is cvt.rn.bf16x2.f32).
        """
        if BF16_BY_BITS and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(dtype)
        return y

    @triton.jit
    def _rms_norm_forward_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        rstd_ptr,
        n_cols,
        stride_x,
        stride_y,
        eps,
        BLOCK: tl.constexpr,
        BF16_BY_BITS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(rstd_ptr + row, rstd)
        # transformers rounds x * rstd to the input dtype, then multiplies by the weight.
        normed = round_to(x * rstd, x_ptr.dtype.element_ty, BF16_BY_BITS).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask).to(tl.float32)
        y = round_to(w * normed, y_ptr.dtype.element_ty, BF16_BY_BITS)
        tl.store(y_ptr + row * stride_y + cols, y, mask=mask)

    @triton.jit
    def _rms_norm_backward_kernel(
        dy_ptr,
        x_ptr,
        w_ptr,
        rstd_ptr,
        dx_ptr,
        dw_partial_ptr,
        n_rows,
        n_cols,
        rows_per_program,
        stride_dy,
        stride_x,
        stride_dx,
        BLOCK: tl.constexpr,
        HAS_DW: tl.constexpr,
        BF16_BY_BITS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DW:
            dw = tl.zeros((BLOCK,), dtype=tl.float32)
        # Without a weight gradient each program takes one row (rows_per_program == 1); with one,
        # a program sums its slab's dw in registers and writes one partial row. 64-bit rows.
        first = pid.to(tl.int64) * rows_per_program
        for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            dxhat = dy * w  # the rounding to x's dtype in the forward passes gradients straight through
            # d/dx of x * rstd(x), with rstd = mean(x^2 + eps)^-1/2: rstd * (dxhat - xhat * mean(dxhat * xhat)).
            dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / n_cols))
            tl.store(dx_ptr + row * stride_dx + cols, round_to(dx, dx_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)
            if HAS_DW:
                dw += dy * round_to(xhat, x_ptr.dtype.element_ty, BF16_BY_BITS).to(tl.float32)
        if HAS_DW:
            tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``t`` as [rows, n_cols] with unit column stride (a view when it can be)."""
    t = t.reshape(-1, n_cols)
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_params(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): a whole row per program, ~16 fp32 values per thread."""
    block = triton.next_power_of_2(n_cols)
    return block, min(max(block // 512, 1), 32)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x``, rounded as transformers' ``LlamaRMSNorm`` rounds.

    Args:
        x: ``[..., n]``, bf16/fp16/fp32.
        weight: ``[n]``, bf16/fp16/fp32, on x's device.
        eps: added to the mean square.

    Returns:
        ``(y, rstd)``: ``y`` of x's shape in ``promote_types(x.dtype, weight.dtype)``, and the
        fp32 per-row ``rstd`` ``[x.numel() // n]`` that :func:`rms_norm_backward` needs.
    """
    n_cols = x.shape[-1]
    _check(
        x.dtype in _DTYPES and weight.dtype in _DTYPES,
        f"x, weight: expected bf16/fp16/fp32, got {x.dtype}, {weight.dtype}",
    )
    _check(
        weight.shape == (n_cols,),
        f"weight: expected shape ({n_cols},) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}",
    )
    _check(weight.device == x.device, f"weight is on {weight.device}, x on {x.device}")
    _check(0 < n_cols <= MAX_COLS, f"x: the last dim must be in [1, {MAX_COLS}], got {n_cols}")
    x2 = _rows(x, n_cols)
    n_rows = x2.shape[0]
    _check(n_rows > 0, "x: cannot normalize an empty tensor")
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, num_warps = _launch_params(n_cols)
    _rms_norm_forward_kernel[(n_rows,)](
        x2,
        weight.contiguous(),
        y,
        rstd,
        n_cols,
        x2.stride(0),
        n_cols,
        eps,
        BLOCK=block,
        BF16_BY_BITS=_INTERPRET,
        num_warps=num_warps,
    )
    return y, rstd


def rms_norm_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, weight_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`rms_norm_forward` from its input ``x`` and saved ``rstd``.

    Args:
        grad_y: the gradient of ``y`` (x's shape, any of bf16/fp16/fp32).
        x, weight, rstd: the forward's input, weight and ``rstd``.
        weight_grad: whether to compute the weight's gradient (a reduction over all rows);
            False for a frozen weight, which makes the backward one pass over the rows.

    Returns:
        ``(grad_x, grad_weight)``: ``grad_x`` in x's dtype; ``grad_weight`` in the weight's
        dtype, summed in fp32, or None when ``weight_grad`` is False.
    """
    n_cols = x.shape[-1]
    _check(grad_y.shape == x.shape, f"grad_y: expected shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    _check(grad_y.dtype in _DTYPES, f"grad_y: expected bf16/fp16/fp32, got {grad_y.dtype}")
    x2, dy2 = _rows(x, n_cols), _rows(grad_y, n_cols)
    n_rows = x2.shape[0]
    _check(rstd.dtype == torch.float32 and rstd.shape == (n_rows,), f"rstd: expected fp32 of shape ({n_rows},)")
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if weight_grad:
        sms = _INTERPRET_SMS if _INTERPRET else torch.cuda.get_device_properties(x.device).multi_processor_count
        programs = min(_DW_PROGRAMS_PER_SM * sms, n_rows)
        dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    else:
        programs, dw_partial = n_rows, dx  # dw_partial is a placeholder: the kernel touches it only with HAS_DW
    block, num_warps = _launch_params(n_cols)
    _rms_norm_backward_kernel[(programs,)](
        dy2,
        x2,
        weight.contiguous(),
        rstd,
        dx,
        dw_partial,
        n_rows,
        n_cols,
        triton.cdiv(n_rows, programs),
        dy2.stride(0),
        x2.stride(0),
        n_cols,
        BLOCK=block,
        HAS_DW=weight_grad,
        BF16_BY_BITS=_INTERPRET,
        num_warps=num_warps,
    )
    return dx, (dw_partial.sum(0).to(weight.dtype) if weight_grad else None)
