"""What every kernel module shares: triton (when it imports), interpreter mode, availability."""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; available() then says False
    triton = tl = None

# TRITON_INTERPRET=1 runs the kernels on the CPU. Triton reads it when it decorates a kernel,
# i.e. when the first kernel module is imported, so it is read here once too.
INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available() -> bool:
    """True when the kernels can run: triton imports and either CUDA or the interpreter is there."""
    return triton is not None and (INTERPRET or torch.cuda.is_available())
