"""The frozen NF4 linear layer: y = x @ dequant(W)^T + b, with W kept only in NF4."""

from __future__ import annotations

import torch
from torch import nn

from qlora_kit.compat import in_backward
from qlora_kit.kernels.dispatch import check_kernel
from qlora_kit.modules.kept import keep_output, kept_output
from qlora_kit.modules.unread import output_unread
from qlora_kit.quant import fp8
from qlora_kit.quant.nf4 import BLOCKSIZE, NESTED_BLOCKSIZE, NF4Tensor, dequantize_nf4

# The attributes holding an NF4Linear's weight, one per NF4Tensor field.
NF4_STORAGE = ("weight_packed", "weight_absmax_q", "weight_nested_absmax", "weight_offset")

# Dtypes the NF4 bytes may be stored as: each element size divides 4, the fp32 offset's size.
QUANT_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)


# A low-rank term ``alpha * u @ v`` a base GEMM adds to its product: LoRA's (t, B^T, scale) forward, (g B, A, scale) back.
LowRank = tuple[torch.Tensor, torch.Tensor, float]


def base_matmul(x: torch.Tensor, base: NF4Linear, plus: LowRank | None = None) -> torch.Tensor:
    """``x @ W^T`` for ``x`` ``[..., K]`` and the frozen NF4 weight of ``base``: in x's dtype, or in e4m3
    (``base.fp8``; with ``base.fp8_forward`` off only inside a backward pass: a checkpoint's recompute).
    ``plus`` ``(u, v, alpha)``: ``+ alpha * u @ v`` for ``u`` ``[x's rows, r]``, the result ``[rows, N]``."""
    if base.fp8 and (base.fp8_forward or in_backward()):
        return _plus(fp8.linear(x, *base.fp8_weight()), plus)
    w = base.dequantized_weight(x.dtype).t()
    return x @ w if plus is None else _plus_then(plus, x.reshape(-1, x.shape[-1]), w)


def base_matmul_grad_input(grad_out: torch.Tensor, base: NF4Linear, plus: LowRank | None = None) -> torch.Tensor:
    """``grad_out @ W`` (``grad_out`` ``[rows, N]``): the gradient of :func:`base_matmul` to its input, the weight
    dequantized again; ``plus`` as there."""
    if base.fp8:
        fp8.release_activation()
        return _plus(fp8.linear_grad_input(grad_out, *base.fp8_weight(transposed=True)), plus)
    w = base.dequantized_weight(grad_out.dtype)
    return grad_out @ w if plus is None else _plus_then(plus, grad_out, w)


def _plus(y: torch.Tensor, plus: LowRank | None) -> torch.Tensor:
    """``y + alpha * u @ v`` in place of y (an FP8 GEMM's output, which cannot start from a given one)."""
    if plus is None:
        return y
    u, v, alpha = plus
    return y.view(-1, y.shape[-1]).addmm_(u, v, alpha=alpha)


def _plus_then(plus: LowRank, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``alpha * u @ v + x @ w``: the rank-r product first, then the large GEMM adds its own into it (beta=1,
    in its epilogue), so no pass over ``[rows, N]`` runs after it (an addmm of rank r would read and write it)."""
    u, v, alpha = plus
    return (
        torch.empty(u.shape[0], v.shape[1], dtype=x.dtype, device=x.device)
        .addmm_(u, v, beta=0, alpha=alpha)
        .addmm_(x, w)
    )


class _NF4MatMul(torch.autograd.Function):
    """x @ W^T for a frozen NF4 weight.

    Autograd would otherwise keep the dequantized weight alive until backward (a
    full-precision copy per layer). Here the context keeps only the layer, and backward
    dequantizes its packed weight again: grad_x = grad_y @ W.
    The layer sits on ``ctx`` rather than in ``save_for_backward`` so that
    activation-offloading hooks never copy its weight. ``unread``: the output is left
    uncomputed (:func:`~qlora_kit.modules.unread.output_unread`); ``kept``: the output the forward
    computed, given back to a recompute (:mod:`qlora_kit.modules.kept`). The backward is the same.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: NF4Linear, unread: bool, kept: torch.Tensor | None = None) -> torch.Tensor:
        ctx.base = base
        if kept is not None:
            return kept.view_as(kept)
        if unread:
            return x.new_empty(*x.shape[:-1], base.out_features)
        # x itself, not a reshaped view: the FP8 path recognises the same tensor coming to q, k and v.
        return base_matmul(x, base)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        g = grad_out.reshape(-1, grad_out.shape[-1])
        return base_matmul_grad_input(g, ctx.base).view(*grad_out.shape[:-1], ctx.base.in_features), None, None, None


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

    With :attr:`fp8` set (:func:`use_fp8_matmuls`) the GEMMs with the weight run in e4m3
    (:mod:`qlora_kit.quant.fp8`); with :attr:`fp8_forward` off as well, only those of the backward
    pass (the recompute of a checkpointed layer and the input gradient), the forward in full precision.
    """

    fp8 = False
    fp8_forward = True
    output_unread_in_recompute = False
    output_kept_in_checkpoint = False

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
        # FP8 matmuls: s_W repeated over max(N, K) (the rowwise GEMMs' [1, columns] scale, for W and
        # W^T) and NF4's code table divided by s_W. Not saved; buffers so that they move with the module.
        self.register_buffer("fp8_scale", None, persistent=False)
        self.register_buffer("fp8_code", None, persistent=False)
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

    def fp8_weight(self, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight as fresh e4m3 codes ``[N, K]`` (``transposed``: of W^T, ``[K, N]``) and their fp32
        scale s_W repeated as a ``[1, rows]`` row, as the rowwise GEMM takes it: W ~ s_W * codes."""
        weight = self.nf4_weight
        if self.fp8_scale is None:  # the weight is frozen: its scales are made once (set_weight clears them)
            scale = fp8.weight_scale(weight)
            self.fp8_scale = scale.expand(max(self.out_features, self.in_features)).contiguous()
            self.fp8_code = fp8.scaled_code(scale)
        codes = fp8.dequantize_nf4_e4m3(weight, self.fp8_scale[0], transposed, code=self.fp8_code)
        return codes, self.fp8_scale[: codes.shape[0]].view(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = kept_output(self)
        y = _NF4MatMul.apply(x.to(self.compute_dtype), self, output_unread(self), kept)
        if kept is None:
            keep_output(self, y)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        storage = "" if self.quant_storage is None else f", quant_storage={self.quant_storage}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nf4, "
            f"compute_dtype={self.compute_dtype}{storage}{', fp8 matmuls' if self.fp8 else ''}"
        )


def _as_storage(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of ``t`` as a flat tensor of ``dtype``, zero-padded to whole elements."""
    data = t.detach().reshape(-1).view(torch.uint8)
    pad = -data.numel() % dtype.itemsize
    if pad:
        data = torch.cat([data, data.new_zeros(pad)])
    return data.view(dtype)


def use_fp8_matmuls(model: nn.Module, forward: bool = True) -> int:
    """Run the GEMMs of every NF4 layer of ``model`` whose shape allows it in e4m3; returns how many.

    ``forward`` False: only the GEMMs of the backward pass (a checkpoint's recompute, the input
    gradient); the forward pass, which gives the loss and the generations, stays in full precision.

    e4m3 GEMMs need Hopper or Ada GPUs (compute capability 8.9) on CUDA; elsewhere they are
    emulated in fp32 (``qlora_kit.compat.scaled_mm``).
    """
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    for device in {m.weight_packed.device for m in layers}:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(
                f"FP8 matmuls need a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}"
            )
    for m in layers:
        m.fp8 = fp8.supports((m.out_features, m.in_features))
        m.fp8_forward = forward
    return sum(m.fp8 for m in layers)
