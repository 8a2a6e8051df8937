"""Checkpoint tensor layouts for 4-bit GPTQ (v1) and AWQ (gemm), per docs/formats.md.

GPTQ v1, Linear with in=K, out=N, group size g (G = K/g groups):
    qweight [K/8, N] int32  packed along the INPUT dim: input channel 8*row + j
                            in bits 4j..4j+3 of qweight[row, col]
    qzeros  [G, N/8] int32  zero - 1, packed along the OUTPUT dim the same way
    scales  [G, N]   fp16
    g_idx   [K]      int32
    bias    [N]      fp16 (only if the layer has one)
    W = scales[g_idx] * (q - (qzeros + 1))

AWQ gemm:
    qweight [K, N/8] int32  packed along the OUTPUT dim, nibble i of word c
                            holding column 8c + order[i], order = [0, 2, 4, 6, 1, 3, 5, 7]
    qzeros  [G, N/8] int32  raw zeros, same packing
    scales  [G, N]   fp16
    W = (q - z) * s
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from qlora_kit.quant.intq import IntQuantWeight, group_count

BITS = 4
PACK = 32 // BITS  # nibbles per int32
GPTQ_ORDER = list(range(PACK))
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _pack_rows(x: Tensor, order: list[int]) -> Tensor:
    """Pack [..., 8*m] nibbles into [..., m] int32: nibble i of word c holds x[..., 8c + order[i]]."""
    x = x.to(torch.int64).reshape(*x.shape[:-1], -1, PACK)[..., order]
    shifts = torch.arange(0, 32, BITS, device=x.device)
    packed = (x << shifts).sum(dim=-1)
    # Reinterpret the unsigned 32-bit words as two's-complement int32.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _unpack_rows(packed: Tensor, order: list[int]) -> Tensor:
    """Inverse of _pack_rows: int32 [..., m] -> uint8 [..., 8*m]."""
    shifts = torch.arange(0, 32, BITS, device=packed.device)
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    x = torch.empty_like(nibbles)
    x[..., order] = nibbles
    return x.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def _check_packable(w: IntQuantWeight, what: str) -> tuple[int, int]:
    if w.bits != BITS:
        raise ValueError(f"{what} packing supports 4-bit weights, got bits={w.bits}")
    n, k = w.q.shape
    if k % PACK != 0 or n % PACK != 0:
        raise ValueError(
            f"{what} packing needs in_features K and out_features N divisible by 8, got weight [N={n}, K={k}]"
        )
    return n, k


def pack_gptq_v1(w: IntQuantWeight, bias: Tensor | None = None) -> dict[str, Tensor]:
    """GPTQ v1 checkpoint tensors (qweight, qzeros, scales, g_idx[, bias]) of one Linear."""
    n, k = _check_packable(w, "GPTQ")
    if (w.zero == 0).any():
        # Stored as zero - 1 = -1, which the 4-bit field cannot hold.
        raise ValueError(
            f"GPTQ v1 stores zero - 1, so a zero point of 0 cannot be stored (weight [N={n}, K={k}], "
            "an asymmetric group whose minimum rounds to 0); use symmetric quantization or AWQ"
        )
    tensors = {
        "qweight": _pack_rows(w.q, GPTQ_ORDER).t().contiguous(),
        "qzeros": _pack_rows(w.zero.t().to(torch.int64) - 1, GPTQ_ORDER),
        "scales": w.scale.t().contiguous().to(torch.float16),
        "g_idx": w.g_idx.to(torch.int32),
    }
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not match out_features N={n}")
        tensors["bias"] = bias.to(torch.float16)
    return tensors


def unpack_gptq_v1(tensors: Mapping[str, Tensor], group_size: int, symmetric: bool = True) -> IntQuantWeight:
    """Read one Linear's GPTQ v1 tensors back into integer codes, scales and zeros."""
    qweight, qzeros, scales, g_idx = (tensors[name] for name in ("qweight", "qzeros", "scales", "g_idx"))
    k8, n = qweight.shape
    k = k8 * PACK
    groups = group_count(k, group_size)
    expected = {"qzeros": (groups, n // PACK), "scales": (groups, n), "g_idx": (k,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"GPTQ {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"for qweight {tuple(qweight.shape)}"
            )
    zero = _unpack_rows(qzeros, GPTQ_ORDER) + 1
    return IntQuantWeight(
        q=_unpack_rows(qweight.t(), GPTQ_ORDER),
        scale=scales.t().float().contiguous(),
        zero=zero.t().contiguous(),
        g_idx=g_idx.to(torch.int32),
        bits=BITS,
        group_size=group_size,
        symmetric=symmetric,
    )


def pack_awq_gemm(w: IntQuantWeight) -> dict[str, Tensor]:
    """AWQ gemm checkpoint tensors (qweight, qzeros, scales) of one Linear."""
    n, k = _check_packable(w, "AWQ")
    groups = w.scale.shape[1]
    if not torch.equal(w.g_idx.long().cpu(), torch.arange(k) // (k // groups)):
        raise ValueError(f"AWQ gemm has no g_idx: weight [N={n}, K={k}] must use contiguous groups (no act-order)")
    return {
        "qweight": _pack_rows(w.q.t(), AWQ_ORDER),
        "qzeros": _pack_rows(w.zero.t(), AWQ_ORDER),
        "scales": w.scale.t().contiguous().to(torch.float16),
    }


def unpack_awq_gemm(tensors: Mapping[str, Tensor], group_size: int) -> IntQuantWeight:
    """Read one Linear's AWQ gemm tensors back into integer codes, scales and zeros."""
    qweight, qzeros, scales = (tensors[name] for name in ("qweight", "qzeros", "scales"))
    k, n8 = qweight.shape
    n = n8 * PACK
    groups = group_count(k, group_size)
    expected = {"qzeros": (groups, n8), "scales": (groups, n)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"AWQ {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"for qweight {tuple(qweight.shape)}"
            )
    return IntQuantWeight(
        q=_unpack_rows(qweight, AWQ_ORDER).t().contiguous(),
        scale=scales.t().float().contiguous(),
        zero=_unpack_rows(qzeros, AWQ_ORDER).t().contiguous(),
        g_idx=torch.arange(k, dtype=torch.int32, device=qweight.device) // (k // groups),
        bits=BITS,
        group_size=group_size,
        symmetric=False,
    )


def marlin_compatible(K: int, N: int, group_size: int, symmetric: bool) -> bool:
    """Whether vLLM's Marlin kernel serves a GPTQ Linear [N, K] (else a slower kernel)."""
    return symmetric and group_size in (-1, 32, 64, 128) and K % 128 == 0 and N % 64 == 0
