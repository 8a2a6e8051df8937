"""The frozen NF4 linear layer: y = x @ dequant(W)^T + b, with W kept only in NF4."""

from __future__ import annotations

import torch
from torch import nn

from qlora_kit.quant.nf4 import NF4Tensor, dequantize_nf4


class _NF4MatMul(torch.autograd.Function):
    """x @ W^T for a frozen NF4 weight.

    Autograd would otherwise keep the dequantized weight alive until backward (a
    full-precision copy per layer). Here the context keeps only a reference to the
    packed weight, and backward dequantizes it again: grad_x = grad_y @ W.
    The packed weight sits on ``ctx`` rather than in ``save_for_backward`` so that
    activation-offloading hooks never copy it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor, kernel: str) -> torch.Tensor:
        ctx.weight, ctx.kernel = weight, kernel
        return x @ dequantize_nf4(weight, x.dtype, kernel=kernel).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = dequantize_nf4(ctx.weight, grad_out.dtype, kernel=ctx.kernel)
        return grad_out @ w, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 with double quantization.

    The packed codes, the 8-bit absmax codes, the nested absmax and the offset are
    buffers (they move with ``.to()`` and appear in ``state_dict``); no full-precision
    copy of the weight is kept. The forward pass runs in ``compute_dtype``.
    """

    def __init__(
        self,
        weight: NF4Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-d weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.kernel = kernel
        self.weight_dtype = weight.dtype
        self.register_buffer("weight_packed", weight.packed)
        self.register_buffer("weight_absmax_q", weight.absmax_q)
        self.register_buffer("weight_nested_absmax", weight.nested_absmax)
        self.register_buffer("weight_offset", weight.offset)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    @property
    def nf4_weight(self) -> NF4Tensor:
        """The weight as an :class:`NF4Tensor` viewing this module's buffers."""
        return NF4Tensor(
            self.weight_packed, self.weight_absmax_q, self.weight_nested_absmax, self.weight_offset,
            torch.Size((self.out_features, self.in_features)), self.weight_dtype,
        )  # fmt: skip

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in full precision (a fresh tensor; ``compute_dtype`` by default)."""
        return dequantize_nf4(self.nf4_weight, dtype or self.compute_dtype, kernel=self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4MatMul.apply(x.to(self.compute_dtype), self.nf4_weight, self.kernel)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, compute_dtype={self.compute_dtype}"
