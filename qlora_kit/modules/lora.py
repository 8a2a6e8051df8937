"""LoRA (Hu et al. 2021) on a frozen base linear: y = base(x) + scale * B(A(dropout(x))).

:class:`LoRALinear` computes it as written, by autograd, as PEFT's ``lora.Linear`` does.
:class:`NF4LoRALinear` computes the same on a frozen :class:`NF4Linear` base in one autograd
function (no dropout), adding the low-rank product into the base GEMM's output.
QAT on either: :mod:`qlora_kit.modules.qat_lora`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qlora_kit.modules.kept import keep_output, kept_output
from qlora_kit.modules.nf4_linear import NF4Linear, base_matmul, base_matmul_grad_input
from qlora_kit.modules.unread import output_unread


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update.

    A is initialised like ``nn.Linear`` (Kaiming-uniform, as PEFT does) and B at zero,
    so the wrapped layer starts out equal to the base. The adapter weights live in
    fp32 and are cast to the input's dtype for the matmuls, as PEFT does.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.scaling = lora_scale(r, alpha, use_rslora)
        device = next((t.device for t in base.buffers()), None) or next(base.parameters()).device
        # Initialised by the CPU generator, then moved: a seed gives the same adapters wherever
        # the base lives (on the GPU, or in CPU memory before FSDP shards it onto the GPUs).
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(device)
        self.lora_B.to(device)
        # Dropout 0 skips the module entirely: no mask, no extra pass over x.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32: what a merge adds to the base weight."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return y + (self.lora_dropout(x) @ a.t() @ b.t()).to(y.dtype) * self.scaling


class NF4LoRALinear(LoRALinear):
    """LoRA on a frozen :class:`NF4Linear`, base and adapter in one autograd function (:class:`_LoRANF4MatMul`).

    The same adapters and initialisation as :class:`LoRALinear`; no dropout, whose mask
    would need a pass over x of its own. Marked ``output_unread_in_recompute``, a checkpointed
    layer's recompute leaves its output uncomputed (:mod:`qlora_kit.modules.unread`); marked
    ``output_kept_in_checkpoint``, it takes the output the forward kept (:mod:`qlora_kit.modules.kept`).
    """

    output_unread_in_recompute = False
    output_kept_in_checkpoint = False

    def __init__(self, base: NF4Linear, r: int, alpha: float, use_rslora: bool = False) -> None:
        if not isinstance(base, NF4Linear):
            raise TypeError(f"NF4LoRALinear needs an NF4Linear base, got {type(base).__name__}")
        super().__init__(base, r, alpha, 0.0, use_rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.base.compute_dtype)
        kept = kept_output(self)
        y = _LoRANF4MatMul.apply(
            x, self.lora_A.weight, self.lora_B.weight, self.base, self.scaling, output_unread(self), kept
        )
        if kept is None:
            keep_output(self, y)
        return y if self.base.bias is None else y + self.base.bias


class _LoRANF4MatMul(torch.autograd.Function):
    """y = x @ W^T + scale * (x @ A^T) @ B^T for a frozen NF4 weight W, in two GEMMs and a rank-r one.

    The base GEMM adds its product to the low-rank one in its epilogue (addmm with beta=1) instead
    of separate scale and add passes over [tokens, out]; backward does the same for grad_x
    (:func:`~qlora_kit.modules.nf4_linear.base_matmul`'s ``plus``). Saved: x and t = x @ A^T (what
    plain LoRA's autograd saves too), A and B in x's dtype; the NF4 weight stays packed on ``ctx``
    and is dequantized again in backward. With ``base.fp8`` the two base GEMMs run in e4m3 (:func:`~qlora_kit.modules.nf4_linear.base_matmul`).
    ``unread``: y is left uncomputed (a recompute that only needs the graph); ``kept``: y as the
    forward computed it, given back to a recompute. In both, t and the backward are the same.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        base: NF4Linear,
        scaling: float,
        unread: bool,
        kept: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        t = x2 @ a.t()
        if kept is not None:
            y = kept.view(-1, base.out_features)
        elif unread:
            y = x2.new_empty(x2.shape[0], base.out_features)
        else:
            # x itself, not x2: the FP8 path recognises the same tensor coming to q, k and v.
            y = base_matmul(x, base, plus=(t, b.t(), scaling)).view(-1, base.out_features)
        ctx.base, ctx.scaling, ctx.adapter_dtype = base, scaling, lora_a.dtype
        # A and B as cast for the forward: backward does not cast them again.
        ctx.save_for_backward(x, t, a, b)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, t, a, b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        a, b = a.to(g.dtype), b.to(g.dtype)
        gb = g @ b  # [tokens, r]
        grad_x = base_matmul_grad_input(g, ctx.base, plus=(gb, a, ctx.scaling))
        grad_a = (gb.t() @ x2).mul_(ctx.scaling)
        grad_b = (g.t() @ t.to(g.dtype)).mul_(ctx.scaling)
        dtype = ctx.adapter_dtype
        return grad_x.view_as(x), grad_a.to(dtype), grad_b.to(dtype), None, None, None, None
