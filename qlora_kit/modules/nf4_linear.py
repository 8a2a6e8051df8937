"""The frozen NF4 linear layer: y = x @ dequant(W)^T + b, with W kept only in NF4."""

from __future__ import annotations

import torch
from torch import nn

from qlora_kit.kernels.dispatch import check_kernel
from qlora_kit.quant.nf4 import BLOCKSIZE, NESTED_BLOCKSIZE, NF4Tensor, dequantize_nf4

# The attributes holding an NF4Linear's weight, one per NF4Tensor field.
NF4_STORAGE = ("weight_packed", "weight_absmax_q", "weight_nested_absmax", "weight_offset")

# Dtypes the NF4 bytes may be stored as: each element size divides 4, the fp32 offset's size.
QUANT_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)


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

    By default the packed codes, the 8-bit absmax codes, the nested absmax and the offset
    are buffers (they move with ``.to()`` and appear in ``state_dict``); no full-precision
    copy of the weight is kept. The forward pass runs in ``compute_dtype``.

    FSDP shards parameters, not buffers. With ``quant_storage`` set (see
    :meth:`set_quant_storage`) the same four tensors are frozen parameters instead, each
    holding its raw bytes as a flat tensor of that dtype, as bitsandbytes' ``Params4bit``
    does: sharding and gathering move bytes, and :attr:`nf4_weight` views them back bit
    for bit. Nothing may *cast* such storage (``model.to(dtype)``, an FSDP mixed-precision
    ``param_dtype`` other than ``quant_storage``): a cast converts the values and destroys
    the bytes, so :attr:`nf4_weight` raises when it finds another dtype.
    """

    def __init__(
        self,
        weight: NF4Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        kernel: str = "auto",
        quant_storage: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-d weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.kernel = check_kernel(kernel)
        self.quant_storage: torch.dtype | None = None
        self.set_weight(weight)
        if quant_storage is not None:
            self.set_quant_storage(quant_storage)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    def set_weight(self, weight: NF4Tensor) -> None:
        """Store ``weight`` (this layer's shape) in place of the current one, in the current storage."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"expected a weight of shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}"
            )
        self.weight_dtype = weight.dtype
        tensors = (weight.packed, weight.absmax_q, weight.nested_absmax, weight.offset)
        for name, tensor in zip(NF4_STORAGE, tensors):
            if self.quant_storage is None:
                self.register_buffer(name, tensor)
            else:
                setattr(self, name, nn.Parameter(_as_storage(tensor, self.quant_storage), requires_grad=False))

    def set_quant_storage(self, dtype: torch.dtype | None) -> None:
        """Keep the NF4 data as buffers (``None``) or as frozen parameters of raw bytes viewed as ``dtype``."""
        if dtype is not None and dtype not in QUANT_STORAGE_DTYPES:
            raise ValueError(f"quant_storage must be one of {QUANT_STORAGE_DTYPES} or None, got {dtype}")
        weight = self.nf4_weight
        for name in NF4_STORAGE:
            delattr(self, name)
        self.quant_storage = dtype
        self.set_weight(weight)

    @property
    def nf4_weight(self) -> NF4Tensor:
        """The weight as an :class:`NF4Tensor` viewing this module's buffers or parameters (no copy).

        Under FSDP the parameters are whole only inside the layer's forward and backward (or
        after ``unshard()``).
        """
        stored = [getattr(self, name) for name in NF4_STORAGE]
        if self.quant_storage is not None:
            stored = self._unpack_storage(stored)
        return NF4Tensor(*stored, torch.Size((self.out_features, self.in_features)), self.weight_dtype)

    def _unpack_storage(self, stored: list[torch.Tensor]) -> list[torch.Tensor]:
        """The NF4 tensors as views of the raw bytes in ``stored`` (without the padding)."""
        cast = {t.dtype for t in stored} - {self.quant_storage}
        if cast:
            raise RuntimeError(
                f"the NF4 storage of this layer was cast from {self.quant_storage} to {cast.pop()}: a cast converts "
                "the values and destroys the packed bytes; do not apply model.to(dtype) or an FSDP mixed-precision "
                "param_dtype to NF4Linear parameters (or set quant_storage to that dtype)"
            )
        n = self.out_features * self.in_features
        n_blocks = -(-n // BLOCKSIZE)
        nbytes = ((n + 1) // 2, n_blocks, 4 * -(-n_blocks // NESTED_BLOCKSIZE), 4)
        packed, absmax_q, nested_absmax, offset = (t.view(torch.uint8)[:size] for t, size in zip(stored, nbytes))
        return [packed, absmax_q, nested_absmax.view(torch.float32), offset.view(torch.float32).reshape(())]

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in full precision (a fresh tensor; ``compute_dtype`` by default)."""
        return dequantize_nf4(self.nf4_weight, dtype or self.compute_dtype, kernel=self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4MatMul.apply(x.to(self.compute_dtype), self.nf4_weight, self.kernel)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        storage = "" if self.quant_storage is None else f", quant_storage={self.quant_storage}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nf4, "
            f"compute_dtype={self.compute_dtype}{storage}"
        )


def _as_storage(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of ``t`` as a flat tensor of ``dtype``, zero-padded to whole elements."""
    data = t.detach().reshape(-1).view(torch.uint8)
    pad = -data.numel() % dtype.itemsize
    if pad:
        data = torch.cat([data, data.new_zeros(pad)])
    return data.view(dtype)
