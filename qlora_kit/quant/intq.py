"""Group-wise int-k quantization grid shared by RTN, GPTQ, AWQ and QAT.

One grid, exactly as the GPTQ and AWQ checkpoints store it (docs/formats.md), so
the integer codes produced here pack losslessly:

    symmetric:  scale = 2*max|w| / (2^bits - 1),   zero = 2^(bits-1)
    asymmetric: scale = (max - min).clamp(1e-5) / (2^bits - 1),
                zero  = clamp(-round(min / scale), 0, 2^bits - 1)
    q = clamp(round(w / scale) + zero, 0, 2^bits - 1)
    W = scale * (q - zero)

Weights use the nn.Linear layout [out_features N, in_features K]; groups of
`group_size` consecutive input columns share one (scale, zero) per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _check_bits(bits: int) -> None:
    # Codes are stored as uint8.
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")


def find_params(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Grid parameters for each row of `w` [rows, n].

    Returns (scale, zero), both float32 of shape [rows, 1] so they broadcast
    against `w`; zero holds integer values.
    """
    _check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"find_params expects a 2-D tensor [rows, n], got shape {tuple(w.shape)}")
    w = w.float()
    maxq = 2**bits - 1
    if symmetric:
        absmax = w.abs().amax(dim=1, keepdim=True)
        # An all-zero row would give scale 0 and 0/0 codes; any scale
        # represents it exactly, so use the range [-1, 1] as the reference GPTQ does.
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        scale = 2 * absmax / maxq
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        wmax = w.amax(dim=1, keepdim=True)
        wmin = w.amin(dim=1, keepdim=True)
        scale = (wmax - wmin).clamp(min=1e-5) / maxq
        zero = (-torch.round(wmin / scale)).clamp(0, maxq)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer codes q = clamp(round(w/scale) + zero, 0, 2^bits-1), as float32.

    `scale` and `zero` broadcast against `w` (e.g. [rows, 1]).
    """
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def quantize_dequantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Round `w` onto the grid and back: scale * (q - zero), float32."""
    return scale * (quantize(w, scale, zero, bits) - zero)


@dataclass
class IntQuantWeight:
    """A group-wise int-k quantized Linear weight [N, K].

    q: uint8 [N, K] codes; scale: float32 [N, G]; zero: uint8 [N, G];
    g_idx: int32 [K], the group of each input column (i // group_size unless
    GPTQ's act-order reordered the columns); group_size is -1 for one group per row.
    """

    q: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Tensor
    bits: int
    group_size: int
    symmetric: bool

    def __post_init__(self) -> None:
        if self.q.dim() != 2:
            raise ValueError(f"q must be [N, K], got shape {tuple(self.q.shape)}")
        n, k = self.q.shape
        if self.scale.dim() != 2 or self.scale.shape[0] != n or self.zero.shape != self.scale.shape:
            raise ValueError(
                f"scale and zero must both be [N={n}, G], got {tuple(self.scale.shape)} and {tuple(self.zero.shape)}"
            )
        if self.g_idx.shape != (k,):
            raise ValueError(f"g_idx must be [K={k}], got shape {tuple(self.g_idx.shape)}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W [N, K] = scale[:, g_idx] * (q - zero[:, g_idx]) in `dtype`."""
        g_idx = self.g_idx.long()
        scale = self.scale.float()[:, g_idx]
        zero = self.zero.float()[:, g_idx]
        return (scale * (self.q.float() - zero)).to(dtype)


def group_count(columns: int, group_size: int) -> int:
    """Number of groups along K; raises a ValueError when group_size does not divide K."""
    if group_size == -1:
        return 1
    if group_size <= 0 or columns % group_size != 0:
        raise ValueError(f"group_size {group_size} must be -1 or a positive divisor of in_features K={columns}")
    return columns // group_size


def rtn_quantize(weight: Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True) -> IntQuantWeight:
    """Round-to-nearest group-wise quantization of a Linear weight [N, K]."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    groups = group_count(k, group_size)
    if not torch.isfinite(weight).all():
        raise ValueError(f"weight of shape {tuple(weight.shape)} has non-finite values")
    # Each (row, group) is one row of the grid: [N*G, K/G].
    w = weight.float().reshape(n * groups, k // groups)
    scale, zero = find_params(w, bits, symmetric)
    q = quantize(w, scale, zero, bits).reshape(n, k)
    g_idx = torch.arange(k, device=weight.device, dtype=torch.int32) // (k // groups)
    return IntQuantWeight(
        q=q.to(torch.uint8),
        scale=scale.reshape(n, groups),
        zero=zero.reshape(n, groups).to(torch.uint8),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )
