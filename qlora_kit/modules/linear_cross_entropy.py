"""Summed next-token NLL through a frozen vocabulary projection, its gradient made in the forward pass.

``nll_sum(h, W, t) = sum_i -log softmax(h_i W^T)[t_i]``, chunk by chunk over the rows of ``h``.
The gradient to ``h`` of one chunk is ``(softmax(z) - onehot(t)) @ W``: it needs the chunk's
logits ``z``, which exist in the forward anyway, so it is computed there and kept (one value per
element of ``h``), and backward only scales it by the incoming gradient. A checkpointed chunk
would instead run the ``[rows, vocab]`` projection and softmax a second time in backward. The
loss is a plain sum, so its gradient to every row is the same scalar: what makes this possible
(per-row weights, as DPO's, are not). ``W`` gets no gradient: for a frozen lm_head only.

On the GPU, one Triton kernel makes a chunk's loss and its gradient in place of its logits
(:mod:`qlora_kit.kernels.cross_entropy`): one read for the logsumexp, one read and write for the
gradient, where the torch path makes an fp32 copy and passes over it for the log-softmax, the
logsumexp, the subtraction, the exp and the cast back.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_kit.kernels.dispatch import check_kernel, use_triton


def supports(lm_head: nn.Module) -> bool:
    """Whether ``lm_head`` is what :func:`linear_nll_sum` takes: a frozen ``nn.Linear`` without bias."""
    return isinstance(lm_head, nn.Linear) and not lm_head.weight.requires_grad and lm_head.bias is None


def linear_nll_sum(
    hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, chunk_tokens: int = 1024, kernel: str = "auto"
) -> torch.Tensor:
    """``sum(-log softmax(lm_head(hidden)).gather(targets))`` for ``hidden`` ``[rows, d]``, in fp32 (float64
    for a float64 lm_head).

    The projection runs as ``lm_head`` runs it here (under autocast, in its dtype) and the softmax in
    fp32, as ``cross_entropy(lm_head(hidden).float(), targets)`` does; the gradient to ``hidden``
    goes through the same projection's dtype. ``kernel``: the softmax's (:mod:`qlora_kit.kernels.dispatch`;
    a float64 lm_head always takes the torch path).
    """
    if not supports(lm_head):
        raise ValueError("linear_nll_sum needs a frozen lm_head without bias")
    # Without a backward to come (evaluation), the gradient is not made.
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _LinearNLLSum.apply(hidden, lm_head, targets, chunk_tokens, need_grad, check_kernel(kernel))


class _LinearNLLSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, chunk_tokens, need_grad, kernel):
        # The softmax in fp32 at least (as cross_entropy(logits.float()) does), in float64 for float64.
        softmax_dtype = torch.promote_types(lm_head.weight.dtype, torch.float32)
        total = hidden.new_zeros((), dtype=softmax_dtype)
        grad = torch.empty_like(hidden) if need_grad else hidden.new_empty(0)
        weight = None  # W in the projection's dtype, cast once (z's dtype is known after the first chunk)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            z = lm_head(h)
            loss, dz = _chunk_loss(z, t, need_grad, softmax_dtype, kernel)
            total += loss
            if need_grad:
                if weight is None:
                    weight = lm_head.weight.to(z.dtype)
                grad[start : start + chunk_tokens] = dz.to(z.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None


def _chunk_loss(
    z: torch.Tensor, t: torch.Tensor, need_grad: bool, softmax_dtype: torch.dtype, kernel: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed NLL of one chunk of logits and, with ``need_grad``, its gradient ``softmax(z) - onehot(t)``
    (in place of ``z`` on the Triton path, of an fp32 copy on the torch path)."""
    if z.dtype != torch.float64 and use_triton(kernel, z):
        from qlora_kit.kernels.cross_entropy import cross_entropy_rows_

        return cross_entropy_rows_(z, t, grad=need_grad).sum(), z if need_grad else None
    logits = z.to(softmax_dtype)
    loss = nn.functional.cross_entropy(logits, t, reduction="sum")
    if not need_grad:
        return loss, None
    dz = logits.sub_(logits.logsumexp(-1, keepdim=True)).exp_()
    dz[torch.arange(t.numel(), device=t.device), t] -= 1
    return loss, dz
