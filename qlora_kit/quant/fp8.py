"""FP8 (e4m3) matmuls for the frozen NF4 base weights: ``y = x @ W^T`` and ``dx = dy @ W``.

Hopper runs e4m3 GEMMs at twice the bf16 rate. The frozen weight W is dequantized from NF4
straight to e4m3 with one scale per tensor (``s_W = max absmax / 448``: NF4's largest code
is 1, so that is max|W|, taken from the absmax alone); the activation x and the gradient dy
get one scale per row (``s = max|row| / 448``), so an outlier token cannot flatten the
others. ``torch._scaled_mm`` multiplies the e4m3 operands with fp32 accumulation and
applies ``s_x[m] * s_W`` (rowwise scaling: the weight's scale repeated per column) on the
way out in the compute dtype:

    y[m, n]  = s_x[m]  * s_W * sum_k q_x[m, k]  * q_W[n, k]
    dx[m, k] = s_dy[m] * s_W * sum_n q_dy[m, n] * q_W[n, k]

e4m3 keeps 3 mantissa bits: every operand moves by at most 2^-4 of itself, a perturbation of
the NF4 base of the size NF4 itself makes of the original weight, far below it in practice
(the errors average out over K). LoRA's A and B, their products and all gradients to them
stay in the compute dtype. ``_scaled_mm`` needs K and N to be multiples of 16: a layer of
another shape keeps the compute-dtype path (:func:`supports`).
"""

from __future__ import annotations

import weakref

import torch

from qlora_kit.compat import scaled_mm
from qlora_kit.quant.nf4 import NF4Tensor, _blockwise_scale, dequantize_absmax, nf4_code

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TINY = 1e-12  # the smallest amax: an all-zero row or weight gets this over 448 as its scale


def supports(weight_shape: torch.Size | tuple[int, int]) -> bool:
    """Whether a ``[N, K]`` weight's GEMMs can run in e4m3 (both sizes multiples of 16)."""
    n, k = weight_shape
    return n % 16 == 0 and k % 16 == 0


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: e4m3 codes ``fp8(x * (448 / amax))`` and fp32 ``amax / 448`` per row ``[M, 1]``."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=TINY)
    # Tensor by tensor: IEEE divisions, as the kernel's (a Python scalar's division may be a reciprocal multiply).
    e4m3_max = torch.full_like(amax, E4M3_MAX)
    return (x.float() * (e4m3_max / amax)).to(E4M3), amax / e4m3_max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise e4m3 quantization of a 2-d tensor: the Triton kernel on CUDA, the torch reference elsewhere."""
    if x.is_cuda:
        from qlora_kit.kernels._triton import available

        if available():
            from qlora_kit.kernels.fp8 import quantize_rows_fp8

            return quantize_rows_fp8(x if x.stride(-1) == 1 else x.contiguous())
    return quantize_rows_reference(x)


# The activation quantized last: (a weak reference to it, its version counter, q, scale). A decoder
# layer's q, k and v projections (and gate and up) multiply one tensor: its e4m3 copy is made once.
_last_activation: tuple[weakref.ref, int, torch.Tensor, torch.Tensor] | None = None


def _forget(ref: weakref.ref) -> None:
    global _last_activation
    if _last_activation is not None and _last_activation[0] is ref:
        _last_activation = None


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of ``x`` viewed as ``[-1, K]``, reused while the same tensor, unchanged, comes again.

    Keyed by the tensor object, weakly (a new tensor at a freed one's address never matches, and
    the copy goes when the tensor does), and by its version counter (an in-place write to it
    invalidates the copy). Inference tensors have no version counter: they are quantized every time.
    """
    global _last_activation
    tracked = not torch.is_inference(x)
    if tracked and _last_activation is not None:
        ref, version, q, s = _last_activation
        if ref() is x and version == x._version:
            return q, s
    q, s = quantize_rows(x.reshape(-1, x.shape[-1]))
    if tracked:
        _last_activation = (weakref.ref(x, _forget), x._version, q, s)
    return q, s


def release_activation() -> None:
    """Drop the kept e4m3 copy. The backward pass calls it: its projections share no input, and a
    checkpoint's recompute would otherwise leave its last copy (the down projection's input, the
    largest) alive through the whole layer's backward."""
    global _last_activation
    _last_activation = None


def weight_scale(t: NF4Tensor) -> torch.Tensor:
    """``s_W``: the fp32 0-d scale that maps max|W| (the largest block absmax) to 448."""
    return dequantize_absmax(t).amax().clamp(min=TINY) / E4M3_MAX


def dequantize_nf4_e4m3_reference(t: NF4Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``fp8(code4[nibble] / s_W * absmax)`` in torch: what the Triton path computes, bit for bit."""
    codes = torch.stack([t.packed >> 4, t.packed & 0xF], dim=1).view(-1)[: t.numel]
    values = (nf4_code(t.device) / scale)[codes.long()]
    return _blockwise_scale(values, dequantize_absmax(t), t.blocksize).view(t.shape).to(E4M3)


def scaled_code(scale: torch.Tensor) -> torch.Tensor:
    """NF4's 16 code values divided by ``s_W``: the table the e4m3 dequant looks codes up in."""
    return nf4_code(scale.device) / scale


def dequantize_nf4_e4m3(
    t: NF4Tensor, scale: torch.Tensor, transposed: bool = False, code: torch.Tensor | None = None
) -> torch.Tensor:
    """W / s_W in e4m3, straight from NF4 (``transposed``: W^T, contiguous).

    On CUDA the NF4 dequant kernels with their code table divided by s_W (``code``: that table,
    :func:`scaled_code`, when the caller keeps it); elsewhere the reference.
    """
    from qlora_kit.kernels.dispatch import use_triton

    if not (t.packed.is_cuda and use_triton("auto", t.packed)):
        w = dequantize_nf4_e4m3_reference(t, scale)
        return w.t().contiguous() if transposed else w
    from qlora_kit.kernels.nf4 import dequantize_nf4_dq, dequantize_nf4_dq_t
    from qlora_kit.quant.nf4 import dynamic_map

    code = scaled_code(scale) if code is None else code
    args = (t.packed, t.absmax_q, t.nested_absmax, t.offset, code, dynamic_map(t.device))
    if not transposed:
        return dequantize_nf4_dq(*args, t.shape, E4M3, t.blocksize, t.nested_blocksize)
    if len(t.shape) == 2 and t.shape[1] % 64 == 0 and t.shape[1] % t.blocksize == 0:
        return dequantize_nf4_dq_t(*args, t.shape, E4M3, t.blocksize, t.nested_blocksize)
    return dequantize_nf4_dq(*args, t.shape, E4M3, t.blocksize, t.nested_blocksize).t().contiguous()


def _matmul(
    q: torch.Tensor, s: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``(s * q) @ (s_b * q_b)^T`` in ``out_dtype``; ``b_t``: e4m3 ``[N, K]``, row-major; ``b_scale``: 0-d or ``[1, N]``."""
    n = b_t.shape[0]
    if b_scale.dim() < 2:
        b_scale = b_scale.expand(1, n).contiguous()
    return scaled_mm(q, b_t.t(), s, b_scale, out_dtype)


def linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` for ``x`` ``[..., K]`` and ``W = w_scale * w_q`` (e4m3 ``[N, K]``), in x's dtype.

    ``w_scale``: s_W, 0-d or repeated as a ``[1, N]`` row (what the rowwise GEMM takes). x is
    quantized by :func:`quantize_activation` (once for all the projections of the same tensor).
    """
    q, s = quantize_activation(x)
    return _matmul(q, s, w_q, w_scale, x.dtype).view(*x.shape[:-1], w_q.shape[0])


def linear_grad_input(grad_out: torch.Tensor, w_q_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``dy @ W`` for ``dy`` ``[M, N]``, given ``W^T = w_scale * w_q_t`` (e4m3 ``[K, N]``, contiguous).

    ``w_scale``: s_W, 0-d or repeated as a ``[1, K]`` row.
    """
    return _matmul(*quantize_rows(grad_out), w_q_t, w_scale, grad_out.dtype)
