"""NF4 with double quantization (QLoRA, Dettmers et al. 2023), bit-compatible with bitsandbytes.

A weight is flattened row-major and cut into blocks of ``blocksize`` (64) elements.
Each block is scaled by its ``absmax`` into [-1, 1] and every element is rounded to
the nearest of the 16 NormalFloat4 code values (midpoint thresholds). Two 4-bit codes
share a byte: element 2i in the high nibble, element 2i+1 in the low nibble.

Double quantization: the fp32 ``absmax`` of each block is itself quantized. Its mean
``offset`` is subtracted, and the centred values are quantized to 8 bits in blocks of
``nested_blocksize`` (256) against the signed dynamic map, with one fp32
``nested_absmax`` per nested block. Cost: 4 + 8/64 + 32/(64*256) = 4.127 bits/param.

Dequantization reverses both steps::

    absmax = dynamic_map[absmax_q] * nested_absmax[block // 256] + offset
    w      = NF4[nibble] * absmax[block]

This file is the torch reference; ``qlora_kit.kernels.nf4`` holds the Triton kernels
that compute the same bits on the GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import torch

from qlora_kit.kernels.dispatch import use_triton

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256

# bitsandbytes get_4bit_type("nf4"): quantiles of N(0, 1) normalised to [-1, 1], code 7 = 0.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

ZERO_CODE = 7  # pads the low nibble of an odd-sized weight's last byte, as bitsandbytes does

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@cache
def nf4_code(device: torch.device) -> torch.Tensor:
    """The 16 NF4 code values (fp32) on ``device``, cached."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@cache
def dynamic_map(device: torch.device) -> torch.Tensor:
    """The 256-entry signed dynamic map of the absmax codes (fp32) on ``device``, cached."""
    return signed_dynamic_map().to(device)


def signed_dynamic_map(max_exponent_bits: int = 7) -> torch.Tensor:
    """The signed 8-bit dynamic tree map (Dettmers 2015) that double quantization uses.

    For each exponent e = 0..6 there are 2^e fraction steps: the midpoints of an even
    split of [0.1, 1], scaled by 10^(e-6), with both signs; plus 0 and 1. 255 values,
    padded with a second 0 to 256 and sorted (the same table as bitsandbytes'
    ``create_dynamic_map(signed=True)``).
    """
    values: list[float] = []
    for e in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        magnitude = 10 ** (-(max_exponent_bits - 1) + e)
        values += (magnitude * means).tolist() + (-magnitude * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """A flat tensor as rows of ``blocksize``, the last row zero-padded."""
    return torch.nn.functional.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)


def _blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Max |x| of each block of a flat fp32 tensor; the last block may be partial."""
    return _blocks(x, blocksize).abs().amax(dim=1)


def _quantize_to_code(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Index of the nearest code value for each element of x / absmax[block] (ties go down)."""
    # Multiply by the reciprocal, as the CUDA kernels do, so the bits match bitsandbytes.
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (_blocks(x, blocksize) * inv[:, None]).clamp(-1, 1).view(-1)[: x.numel()]
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8)


def _blockwise_scale(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    return (_blocks(values, blocksize) * absmax[:, None]).view(-1)[: values.numel()]


@dataclass
class NF4Tensor:
    """A weight stored as NF4 with double-quantized absmax (bitsandbytes' layout).

    Attributes:
        packed: uint8 ``[(n + 1) // 2]``, two 4-bit codes per byte, first in the high nibble.
        absmax_q: uint8 ``[n_blocks]``, the 8-bit codes of ``absmax - offset``.
        nested_absmax: fp32 ``[ceil(n_blocks / 256)]``.
        offset: fp32 scalar, the mean of the first-level absmax.
        shape: the original weight's shape.
        dtype: the original weight's dtype (what ``dequantize`` returns by default).
    """

    packed: torch.Tensor
    absmax_q: torch.Tensor
    nested_absmax: torch.Tensor
    offset: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = BLOCKSIZE
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def nbytes(self) -> int:
        """Bytes held on the device: codes, absmax codes, nested absmax and offset."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax_q, self.nested_absmax, self.offset))

    def to(self, device: torch.device | str) -> NF4Tensor:
        return NF4Tensor(
            self.packed.to(device),
            self.absmax_q.to(device),
            self.nested_absmax.to(device),
            self.offset.to(device),
            self.shape,
            self.dtype,
            self.blocksize,
            self.nested_blocksize,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"NF4 quantizes float32/float16/bfloat16 weights, got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(weight.shape)}")


def double_quantize_absmax(absmax: torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE):
    """Quantize fp32 first-level absmax to 8-bit codes around their mean.

    Returns ``(absmax_q, nested_absmax, offset)``.
    """
    offset = absmax.mean()
    centred = absmax - offset
    nested_absmax = _blockwise_absmax(centred, nested_blocksize)
    absmax_q = _quantize_to_code(centred, nested_absmax, dynamic_map(absmax.device), nested_blocksize)
    return absmax_q, nested_absmax, offset


def dequantize_absmax(t: NF4Tensor) -> torch.Tensor:
    """The fp32 first-level absmax of every block: ``map[absmax_q] * nested_absmax + offset``."""
    centred = _blockwise_scale(dynamic_map(t.device)[t.absmax_q.long()], t.nested_absmax, t.nested_blocksize)
    return centred + t.offset


def quantize_nf4_reference(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> NF4Tensor:
    """Quantize with plain torch ops (any device); the reference for the Triton kernel."""
    _check_weight(weight)
    x = weight.detach().reshape(-1).float()
    absmax = _blockwise_absmax(x, blocksize)
    codes = _quantize_to_code(x, absmax, nf4_code(x.device), blocksize)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE)])
    packed = (codes[0::2] << 4) | codes[1::2]
    absmax_q, nested_absmax, offset = double_quantize_absmax(absmax)
    return NF4Tensor(packed, absmax_q, nested_absmax, offset, weight.shape, weight.dtype, blocksize)


def dequantize_nf4_reference(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize with plain torch ops (any device); computed in fp32, then cast."""
    codes = torch.stack([t.packed >> 4, t.packed & 0xF], dim=1).view(-1)[: t.numel]
    values = nf4_code(t.device)[codes.long()]
    w = _blockwise_scale(values, dequantize_absmax(t), t.blocksize)
    return w.view(t.shape).to(dtype or t.dtype)


def quantize_nf4(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> NF4Tensor:
    """Quantize a weight to NF4 + double-quantized absmax (Triton on CUDA, torch elsewhere)."""
    _check_weight(weight)
    if blocksize != BLOCKSIZE:
        raise ValueError(f"only blocksize {BLOCKSIZE} is supported (bitsandbytes' default), got {blocksize}")
    if use_triton("auto", weight):
        from qlora_kit.kernels.nf4 import quantize_nf4_blocks

        packed, absmax = quantize_nf4_blocks(weight.reshape(-1), nf4_code(weight.device), blocksize)
        absmax_q, nested_absmax, offset = double_quantize_absmax(absmax)
        return NF4Tensor(packed, absmax_q, nested_absmax, offset, weight.shape, weight.dtype, blocksize)
    return quantize_nf4_reference(weight, blocksize)


def dequantize_nf4(
    t: NF4Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None, kernel: str = "auto"
) -> torch.Tensor:
    """Dequantize to ``dtype`` (default: the original dtype).

    ``kernel``: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch" (:mod:`qlora_kit.kernels.dispatch`).
    ``out``: an optional preallocated tensor of the weight's shape to write into.
    """
    dtype = dtype or t.dtype
    if use_triton(kernel, t.packed):
        from qlora_kit.kernels.nf4 import dequantize_nf4_dq

        return dequantize_nf4_dq(
            t.packed,
            t.absmax_q,
            t.nested_absmax,
            t.offset,
            nf4_code(t.device),
            dynamic_map(t.device),
            t.shape,
            dtype,
            t.blocksize,
            t.nested_blocksize,
            out=out,
        )
    w = dequantize_nf4_reference(t, dtype)
    return out.copy_(w) if out is not None else w


# Serialization in the layout transformers uses for bitsandbytes 4-bit checkpoints.

_QS_KEY = "quant_state.bitsandbytes__nf4"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def nf4_state_dict(t: NF4Tensor, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """Tensors for a safetensors file, under bitsandbytes' ``QuantState`` keys."""
    meta = {
        "quant_type": "nf4",
        "blocksize": t.blocksize,
        "dtype": _DTYPE_NAMES[t.dtype],
        "shape": list(t.shape),
        "nested_blocksize": t.nested_blocksize,
        "nested_dtype": "float32",
        "nested_offset": t.offset.item(),
    }
    return {
        prefix: t.packed.reshape(-1, 1),
        f"{prefix}.absmax": t.absmax_q,
        f"{prefix}.quant_map": nf4_code(t.device).clone(),
        f"{prefix}.nested_absmax": t.nested_absmax,
        f"{prefix}.nested_quant_map": dynamic_map(t.device).clone(),
        f"{prefix}.{_QS_KEY}": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8),
    }


def nf4_from_state_dict(sd: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Tensor:
    """Inverse of :func:`nf4_state_dict`; also reads what bitsandbytes/transformers save."""
    missing = [k for k in ("", ".absmax", ".nested_absmax", f".{_QS_KEY}") if f"{prefix}{k}" not in sd]
    if missing:
        raise KeyError(f"not an NF4 double-quantized weight: missing {[prefix + k for k in missing]}")
    meta = json.loads(bytes(sd[f"{prefix}.{_QS_KEY}"].tolist()).decode())
    if meta.get("quant_type") != "nf4" or "nested_offset" not in meta:
        raise ValueError(f"{prefix}: only NF4 with double quantization is supported, got {meta}")
    for key, expected in ((".quant_map", nf4_code), (".nested_quant_map", dynamic_map)):
        table = sd.get(prefix + key)
        if table is not None and not torch.equal(table.float().cpu(), expected(torch.device("cpu"))):
            raise ValueError(f"{prefix}{key}: the code table differs from the standard one")
    device = sd[prefix].device
    return NF4Tensor(
        packed=sd[prefix].reshape(-1).view(torch.uint8),
        absmax_q=sd[f"{prefix}.absmax"].view(torch.uint8),
        nested_absmax=sd[f"{prefix}.nested_absmax"].float(),
        offset=torch.tensor(meta["nested_offset"], dtype=torch.float32, device=device),
        shape=torch.Size(meta["shape"]),
        dtype=getattr(torch, meta["dtype"]),
        blocksize=meta["blocksize"],
        nested_blocksize=meta["nested_blocksize"],
    )


def from_bitsandbytes(packed: torch.Tensor, quant_state) -> NF4Tensor:
    """Import a weight quantized by ``bitsandbytes.functional.quantize_4bit`` without requantizing."""
    qs = quant_state
    if qs.quant_type != "nf4" or not qs.nested:
        raise ValueError(
            f"expected an NF4 QuantState with double quantization, got quant_type={qs.quant_type!r}, nested={qs.nested}"
        )
    return NF4Tensor(
        packed=packed.reshape(-1).view(torch.uint8),
        absmax_q=qs.absmax.view(torch.uint8),
        nested_absmax=qs.state2.absmax.float(),
        offset=qs.offset.float().reshape(()),
        shape=torch.Size(qs.shape),
        dtype=qs.dtype,
        blocksize=qs.blocksize,
        nested_blocksize=qs.state2.blocksize,
    )


def save_nf4(tensors: dict[str, NF4Tensor], path: str) -> None:
    """Save named NF4 weights to one safetensors file (bitsandbytes' key layout)."""
    from safetensors.torch import save_file

    sd: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        sd.update({k: v.contiguous().cpu() for k, v in nf4_state_dict(t, name).items()})
    save_file(sd, path)


def load_nf4(path: str) -> dict[str, NF4Tensor]:
    """Load the NF4 weights saved by :func:`save_nf4` (or by transformers for a bnb 4-bit model)."""
    from safetensors.torch import load_file

    sd = load_file(path)
    names = [k[: -len(f".{_QS_KEY}")] for k in sd if k.endswith(f".{_QS_KEY}")]
    return {name: nf4_from_state_dict(sd, name) for name in names}
