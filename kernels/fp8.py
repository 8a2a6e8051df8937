"""Triton kernel for FP8 (e4m3) rowwise quantization of activations and gradients.

One program per row: it finds the row's max|x|, then writes ``q = fp8(x * (448 / amax))``
and the row's scale ``amax / 448``. A row of up to 16,384 elements is read once and kept in
registers; a longer one is read twice (the second time from L2). These are the operands
``torch._scaled_mm`` takes with rowwise scaling. It computes exactly what
``qlora_kit.quant.fp8.quantize_rows_reference`` computes (IEEE divisions, one fp32 multiply,
round-to-nearest-even cast); it runs on CUDA only: the interpreter's fp32 -> fp8 cast rounds
wrong at power-of-two boundaries, so the CPU takes the torch reference.
"""

from __future__ import annotations

import torch

from qlora_kit.kernels._triton import tl, triton

_ONE_PASS_MAX = 16384  # the longest row kept in registers (16 warps: 32 fp32 values per thread)
_TWO_PASS_BLOCK = 4096

if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_ptr += row * stride_x
        q_ptr += row * K
        if ONE_PASS:
            offs = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.abs(x)
        else:
            amax = tl.zeros((BLOCK,), tl.float32)
            for start in range(0, K, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
        # An all-zero row: the reference's smallest amax (quant.fp8.TINY), so zero codes and a tiny scale.
        row_amax = tl.maximum(tl.max(amax, axis=0), 1e-12)
        inv = tl.math.div_rn(tl.full((), 448.0, tl.float32), row_amax)
        if ONE_PASS:
            tl.store(q_ptr + offs, (x * inv).to(q_ptr.dtype.element_ty), mask=offs < K)
        else:
            for start in range(0, K, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
                tl.store(q_ptr + offs, (x * inv).to(q_ptr.dtype.element_ty), mask=offs < K)
        tl.store(scale_ptr + row, tl.math.div_rn(row_amax, tl.full((), 448.0, tl.float32)))


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` for a 2-d CUDA tensor whose rows are contiguous: e4m3 ``[M, K]`` and fp32 ``[M, 1]``."""
    if x.dim() != 2 or x.stride(1) != 1 or not x.is_cuda:
        raise ValueError(f"expected a 2-d CUDA tensor with contiguous rows, got shape {tuple(x.shape)} on {x.device}")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    one_pass = k <= _ONE_PASS_MAX
    block = triton.next_power_of_2(k) if one_pass else _TWO_PASS_BLOCK
    warps = 16 if block > 4096 else 8 if block >= 2048 else 4
    _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), BLOCK=block, ONE_PASS=one_pass, num_warps=warps)
    return q, scale
