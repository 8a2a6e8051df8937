"""The one ``kernel`` choice every op with a Triton kernel and a torch path shares.

``"auto"``: Triton for CUDA tensors when it runs there, torch elsewhere; ``"triton"``: always
the kernel (on CPU tensors under ``TRITON_INTERPRET=1``, for tests); ``"torch"``: never.
Triton is imported only when the answer depends on it: the torch path never needs it.
"""

from __future__ import annotations

import torch

KERNELS = ("auto", "triton", "torch")


def check_kernel(kernel: str) -> str:
    """``kernel`` itself when it is one of :data:`KERNELS`; ValueError naming the choices otherwise."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got '{kernel}'")
    return kernel


def use_triton(kernel: str, t: torch.Tensor) -> bool:
    """Whether an op on ``t`` runs its Triton kernel under the choice ``kernel``."""
    if check_kernel(kernel) != "auto":
        return kernel == "triton"
    if not t.is_cuda:
        return False
    from qlora_kit.kernels._triton import available

    return available()
