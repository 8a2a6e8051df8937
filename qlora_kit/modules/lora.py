"""LoRA (Hu et al. 2021) on a frozen base linear: y = base(x) + scale * B(A(dropout(x)))."""

from __future__ import annotations

import math

import torch
from torch import nn


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
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        # Dropout 0 skips the module entirely: no mask, no extra pass over x.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32: what a merge adds to the base weight."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return y + (self.lora_dropout(x) @ a.t() @ b.t()).to(y.dtype) * self.scaling
