"""Fine-tune LoRA adapters on an NF4 base: `accelerate launch train.py recipe.yaml [key=value ...]`.

The same as `qlora-kit train recipe.yaml [key=value ...]`; `python train.py ...` works too.
"""

import os
import sys

# Run as a script, Python puts this folder first on sys.path, where kernels/ would shadow the
# PyPI package `kernels` that transformers and bitsandbytes import (ours installs as qlora_kit.kernels).
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]

from qlora_kit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
