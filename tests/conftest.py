"""Session-wide test setup."""

import os

import torch

# Without CUDA, Triton kernels run in Triton's interpreter on the CPU. Triton reads
# TRITON_INTERPRET once (the first time anything imports and uses it, e.g. bitsandbytes),
# so it is set here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
