"""A Triton kernel for the softmax cross-entropy of one chunk of logits and its gradient, in place.

For each row ``z`` of logits and its target ``t``:

    lse = log(sum_j exp(z_j))              (online: a running max m and sum s of exp(z_j - m))
    loss = lse - z_t
    dz_j = exp(z_j - lse) - [j == t]       (d loss / d z_j, written over z)

One program per row reads the row twice (once for lse, once for the gradient) and writes it once,
all in fp32 in registers: 6 bytes per bf16 logit instead of the fp32 copy, log-softmax, logsumexp,
subtract, exp and cast passes of the torch path (about 40 bytes each). Memory bound; a 128k
vocabulary row is 32 tiles of ``_BLOCK``.
"""

from __future__ import annotations

import torch

from qlora_kit.kernels._triton import DTYPES as _DTYPES
from qlora_kit.kernels._triton import INTERPRET as _INTERPRET
from qlora_kit.kernels._triton import available, tl, triton  # noqa: F401 (available is re-exported)

_BLOCK = 4096  # logits per tile: 16 per thread at 8 warps
_WARPS = 8


if triton is not None:
    from qlora_kit.kernels.rmsnorm import round_to

    @triton.jit
    def _cross_entropy_kernel(
        z_ptr,
        t_ptr,
        loss_ptr,
        stride,
        V,
        BLOCK: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        BF16_BY_BITS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(t_ptr + row)
        tl.store(loss_ptr + row, lse - tl.load(z_row + t).to(tl.float32))
        if WRITE_GRAD:
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < V
                p = tl.exp(tl.load(z_row + cols, mask=mask).to(tl.float32) - lse)
                dz = tl.where(cols == t, p - 1.0, p)
                tl.store(z_row + cols, round_to(dz, z_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Each row's ``-log softmax(logits)[target]`` in fp32; with ``grad``, ``logits`` is overwritten by
    ``softmax(logits) - onehot(targets)`` (the loss's gradient to them, rounded once to their dtype).

    Args:
        logits: ``[rows, vocab]``, bf16/fp16/fp32, rows contiguous (unit stride along the vocabulary).
        targets: ``[rows]`` integer class indices, each in ``[0, vocab)`` (no ignored rows).
    """
    if logits.dim() != 2 or logits.dtype not in _DTYPES or logits.stride(1) != 1:
        raise ValueError(
            f"logits: expected a [rows, vocab] bf16/fp16/fp32 tensor with contiguous rows, got "
            f"{tuple(logits.shape)} {logits.dtype} with strides {logits.stride()}"
        )
    if targets.shape != logits.shape[:1] or targets.device != logits.device:
        raise ValueError(
            f"targets: expected shape ({logits.shape[0]},) on {logits.device}, got {tuple(targets.shape)} on "
            f"{targets.device}"
        )
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        _cross_entropy_kernel[(logits.shape[0],)](
            logits,
            targets,
            loss,
            logits.stride(0),
            logits.shape[1],
            BLOCK=_BLOCK,
            WRITE_GRAD=grad,
            BF16_BY_BITS=_INTERPRET,
            num_warps=_WARPS,
        )
    return loss
