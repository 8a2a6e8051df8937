"""Fake quantization with a straight-through estimator, for quantization-aware training.

Forward: the weight is rounded onto the deployment grid and back (quantize-dequantize),
so the loss sees exactly the weight the exported model will hold:

* ``int``: the group-wise int-k grid of :mod:`qlora_kit.quant.intq`, the grid of the
  RTN/GPTQ/AWQ exporters, symmetric or asymmetric, with the group parameters
  (scale, zero) found on the current weight;
* ``nf4``: NF4 with blocksize 64 and double-quantized absmax (:mod:`qlora_kit.quant.nf4`);
* activations, optionally: symmetric int-k per token, ``scale = absmax / (2^(bits-1) - 1)``.

Backward: the straight-through estimator (Bengio et al. 2013). ``round`` has zero
derivative almost everywhere, so the STE takes it as the identity, and the group
parameters are taken as constants. What remains is the quantizer's clamp: the gradient
passes where the grid reaches the value and is zero where the value is clipped, i.e. lies
beyond the grid's end codes. The boolean ``pass mask`` says which. This module computes the
forward values and the mask; the QAT LoRA linear (:mod:`qlora_kit.modules.qat_lora`) applies
them in its autograd function. The grid's range is fitted to each group's own values, so
clipping happens in one case only:

* int, ``q = clamp(round(w / scale) + zero, 0, 2^bits - 1)``:

  - symmetric: the scale puts ``±max|w|`` at ``±(2^(bits-1) - 1/2)`` steps, within half
    a step of the end codes, so nothing is clipped and no mask is kept. (``+max|w|``
    sits on the rounding tie above the top code, so ``round`` takes it one past the top
    and the clamp brings it back: that is a rounding error of half a step, like any
    other, not a clipping, and its gradient passes.)
  - asymmetric: the zero is rounded, so a group's min and max land within half a step
    of the end codes while the zero is in ``[0, 2^bits - 1]``; nothing is clipped. When
    the group lies on one side of zero by more than half a step, the zero is clamped to
    0 or ``2^bits - 1``, the grid no longer reaches the group's far end, and the values
    whose code falls outside ``[0, 2^bits - 1]`` are clipped: these, and only these,
    have a zero gradient (PyTorch's ``fake_quantize_per_channel_affine`` masks the same
    values; it would also mask the rounding ties above).

* nf4: every element is divided by its own block's absmax, so it lies in [-1, 1],
  inside the code range: nothing is clipped and no mask is kept. The double
  quantization rescales a block by ``absmax' / absmax`` (about 1), which the STE drops
  along with the other group parameters.
* activations: per-token absmax puts every element within ``qmax`` steps of zero (at
  most one float32 rounding above, which ``round`` brings back), so nothing is clipped,
  there is no clamp, and the gradient is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qlora_kit.quant.intq import find_params, group_count, quantize_dequantize
from qlora_kit.quant.nf4 import dequantize_nf4, quantize_nf4

FORMATS = ("int", "nf4")


@dataclass(frozen=True)
class FakeQuantConfig:
    """What to fake-quantize, mirroring the recipe's ``qat`` section.

    format: ``"int"`` (the intq grid) or ``"nf4"`` (blocksize 64, double-quantized absmax;
        ``bits``, ``group_size`` and ``symmetric`` do not apply).
    bits: int-k bits, 2..8 (4 for nf4).
    group_size: input columns per group, or -1 for one group per row.
    symmetric: the symmetric (GPTQ sym=True) or asymmetric (AWQ) grid.
    activation_bits: None, or the bits of per-token symmetric activation fake-quant.
    """

    format: str = "int"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    activation_bits: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if not 2 <= self.bits <= 8 or (self.format == "nf4" and self.bits != 4):
            raise ValueError(f"bits must be in [2, 8] (4 for nf4), got {self.bits} for format {self.format!r}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be -1 or positive, got {self.group_size}")
        if self.activation_bits is not None and not 2 <= self.activation_bits <= 8:
            raise ValueError(f"activation_bits must be None or in [2, 8], got {self.activation_bits}")


def quantize_dequantize_weight(w: Tensor, cfg: FakeQuantConfig) -> tuple[Tensor, Tensor | None]:
    """The weight on the deployment grid, and the STE pass mask (None: nothing can be clipped).

    No autograd: this is the forward value the QAT linear builds on; its backward
    multiplies the gradient by the mask. ``int`` needs a 2-d ``[out_features, in_features]``
    weight. The result has ``w``'s dtype (computed in float32, as the exporters do).
    """
    if cfg.format == "nf4":
        return dequantize_nf4(quantize_nf4(w), w.dtype), None
    if w.dim() != 2:
        raise ValueError(f"int fake-quant needs a 2-d weight [out_features, in_features], got {tuple(w.shape)}")
    n, k = w.shape
    groups = group_count(k, cfg.group_size)
    # One row of the grid per (row, group), exactly as rtn_quantize lays it out.
    w_groups = w.float().reshape(n * groups, k // groups)
    scale, zero = find_params(w_groups, cfg.bits, cfg.symmetric)
    w_q = quantize_dequantize(w_groups, scale, zero, cfg.bits).reshape(n, k).to(w.dtype)
    if cfg.symmetric:
        return w_q, None
    maxq = 2**cfg.bits - 1
    zero_raw = -torch.round(w_groups.amin(dim=1, keepdim=True) / scale)  # find_params' zero before its clamp
    code = torch.round(w_groups / scale) + zero  # before intq's clamp
    clipped = ((zero_raw < 0) | (zero_raw > maxq)) & ((code < 0) | (code > maxq))
    return w_q, ~clipped.reshape(n, k)


def quantize_dequantize_activation(x: Tensor, bits: int) -> Tensor:
    """Symmetric per-token (last dim) int-k quantize-dequantize, in ``x``'s dtype.

    ``scale = max|x| / (2^(bits-1) - 1)`` per token; no autograd.
    """
    qmax = 2 ** (bits - 1) - 1
    x32 = x.float()
    # An all-zero token would give scale 0 and 0/0.
    absmax = x32.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    scale = absmax / qmax
    return (torch.round(x32 / scale) * scale).to(x.dtype)
