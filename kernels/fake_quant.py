"""Triton kernel for QAT on an NF4 base: fq(dequant(W) + scale * B @ A) in one pass.

The torch path (``qlora_kit.modules.fake_quant``) makes about ten fp32 passes over each
weight (dequantize, B @ A, add, group min/max, divide, round, clamp, dequantize, cast)
in the forward pass, again when checkpointing recomputes it, and again in backward. This
kernel reads the packed NF4 weight once and writes the fake-quantized weight once, in the
matmul dtype: per tile of BLOCK_N rows x one quantization group it dequantizes the NF4
codes (as ``kernels/nf4.py``), adds the rank-r product from registers (``tl.dot`` in
IEEE fp32), finds each row's group scale and zero as ``qlora_kit.quant.intq.find_params``
does, and rounds onto the grid. Division is IEEE (``div_rn``), rounding is half to even,
and fp fusion is off, so each step rounds as torch does; only the order of the r-term
sum in B @ A can differ from torch's GEMM, which moves a merged value by an ulp and,
rarely, a code by one step.

It also counts the elements the STE mask zeroes (an asymmetric group whose zero point was
clamped, see ``fake_quant``): when there are none, which is the rule, backward needs no
mask.
"""

from __future__ import annotations

import torch

from qlora_kit.kernels._triton import INTERPRET as _INTERPRET
from qlora_kit.kernels._triton import tl, triton

_BLOCK_N = 32
_NUM_WARPS = 4
GROUP_SIZES = (16, 32, 64, 128, 256)  # tl.arange needs a power of two; tl.dot at least 16


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        # Adding and subtracting 1.5 * 2^23 rounds an fp32 |x| < 2^22 to an integer, half to
        # even (IEEE round-to-nearest), as torch.round does; codes are far below 2^22.
        magic = 12582912.0
        return (x + magic) - magic

    @triton.jit
    def _fq_merged_nf4_kernel(
        packed_ptr,
        absmax_q_ptr,
        nested_ptr,
        offset_ptr,
        code4_ptr,
        code8_ptr,
        a_ptr,
        b_ptr,
        out_ptr,
        clipped_ptr,
        scaling,
        n,
        k,
        r,
        BLOCK_N: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
        MAXQ: tl.constexpr,
        SYMMETRIC: tl.constexpr,
        BF16_BY_BITS: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
        row_ok = rows < n
        mask = row_ok[:, None]

        # The base weight, dequantized exactly as kernels/nf4.py does (element e: nibble of byte e // 2).
        e = rows[:, None].to(tl.int64) * k + cols[None, :]
        byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0)
        nibble = tl.where((e & 1) == 0, byte >> 4, byte & 0xF).to(tl.int32)
        block = e // BLOCKSIZE
        absmax_q = tl.load(absmax_q_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(code8_ptr + absmax_q) * nested + tl.load(offset_ptr)
        w = tl.load(code4_ptr + nibble) * absmax

        # + scaling * (B @ A) over this tile: B's rows and A's columns, rank padded to BLOCK_R.
        rank = tl.arange(0, BLOCK_R)
        b = tl.load(b_ptr + rows[:, None] * r + rank[None, :], mask=mask & (rank[None, :] < r), other=0.0)
        a = tl.load(a_ptr + rank[:, None] * k + cols[None, :], mask=rank[:, None] < r, other=0.0)
        delta = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        merged = w + delta * scaling

        # Each row's group parameters, as intq.find_params computes them.
        if SYMMETRIC:
            amax = tl.max(tl.abs(merged), axis=1)
            amax = tl.where(amax == 0.0, 1.0, amax)
            scale = tl.math.div_rn(2.0 * amax, tl.full((BLOCK_N,), MAXQ, tl.float32))
            zero = tl.full((BLOCK_N,), (MAXQ + 1) // 2, tl.float32)
        else:
            wmax = tl.max(merged, axis=1)
            wmin = tl.min(merged, axis=1)
            scale = tl.math.div_rn(tl.maximum(wmax - wmin, 1e-5), tl.full((BLOCK_N,), MAXQ, tl.float32))
            zero_raw = -_round_half_even(tl.math.div_rn(wmin, scale))
            zero = tl.minimum(tl.maximum(zero_raw, 0.0), MAXQ)

        code = _round_half_even(tl.math.div_rn(merged, scale[:, None])) + zero[:, None]
        w_q = scale[:, None] * (tl.minimum(tl.maximum(code, 0.0), MAXQ) - zero[:, None])

        if not SYMMETRIC:
            # Clipped: outside the codes, in a group whose zero point had to be clamped.
            zero_clamped = (zero_raw < 0.0) | (zero_raw > MAXQ)
            clipped = mask & zero_clamped[:, None] & ((code < 0.0) | (code > MAXQ))
            tl.atomic_add(clipped_ptr, tl.sum(tl.sum(clipped.to(tl.int32), axis=1), axis=0))

        if BF16_BY_BITS:
            # Round to nearest even on the bits: the interpreter's fp32->bf16 cast does not.
            bits = w_q.to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            w_q = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out_ptr + e, w_q.to(out_ptr.dtype.element_ty), mask=mask)


def supports(k: int, group_size: int) -> bool:
    """Whether the kernel handles rows of ``k`` input features in groups of ``group_size``."""
    return group_size in GROUP_SIZES and k % group_size == 0


def fake_quant_merged_nf4(
    packed: torch.Tensor,
    absmax_q: torch.Tensor,
    nested_absmax: torch.Tensor,
    offset: torch.Tensor,
    code4: torch.Tensor,
    code8: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bits: int,
    group_size: int,
    symmetric: bool,
    dtype: torch.dtype,
    blocksize: int = 64,
    nested_blocksize: int = 256,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fq(dequant(W) + scaling * lora_b @ lora_a)`` on the int grid, and the clipped count.

    Args:
        packed, absmax_q, nested_absmax, offset, code4, code8: the NF4 weight's storage, as
            for ``kernels.nf4.dequantize_nf4_dq``; its shape is ``[lora_b rows, lora_a columns]``.
        lora_a: ``[r, k]``, lora_b: ``[n, r]`` (fp32 or bf16; the product is formed in fp32).
        scaling: the LoRA scale.
        bits, group_size, symmetric: the int grid (``qlora_kit.quant.intq``); group_size one
            of :data:`GROUP_SIZES` dividing k.
        dtype: the output dtype (the matmul's).

    Returns:
        ``(w_q, clipped)``: the fake-quantized weight ``[n, k]`` in ``dtype``, and an int32
        one-element tensor counting the elements the STE mask zeroes (None when symmetric:
        the symmetric grid clips nothing).
    """
    n, r = lora_b.shape
    k = lora_a.shape[1]
    if lora_a.shape[0] != r or not supports(k, group_size) or packed.numel() != (n * k + 1) // 2:
        raise ValueError(
            f"fake_quant_merged_nf4: lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}, "
            f"{packed.numel()} packed bytes and group_size {group_size} do not fit together"
        )
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    clipped = torch.zeros(1, dtype=torch.int32, device=packed.device)
    grid = (triton.cdiv(n, _BLOCK_N), k // group_size)
    _fq_merged_nf4_kernel[grid](
        packed,
        absmax_q,
        nested_absmax,
        offset,
        code4,
        code8,
        lora_a.contiguous(),
        lora_b.contiguous(),
        out,
        clipped,
        float(scaling),
        n,
        k,
        r,
        BLOCK_N=_BLOCK_N,
        GROUP=group_size,
        BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize,
        MAXQ=2**bits - 1,
        SYMMETRIC=symmetric,
        BF16_BY_BITS=_INTERPRET and dtype == torch.bfloat16,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out, None if symmetric else clipped
