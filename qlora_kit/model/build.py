"""Random-weight NF4 models of any Llama-family shape, for speed and memory work.

The tensors are generated on the device one at a time and go through the same
:func:`qlora_kit.model.load.materialize` as a real checkpoint, so a benchmark on a
random 65B model measures exactly what loading real 65B weights produces.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from qlora_kit.model.load import empty_model, materialize
from qlora_kit.modules.nf4_linear import NF4Linear

# Shapes used by the benchmarks (transformers config fields).
SHAPES = {
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "llama-65b": dict(
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=64,
        vocab_size=32000,
    ),
    "llama-2-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}


def llama_config(shape: str, **overrides):
    """A ``LlamaConfig`` for one of :data:`SHAPES` (``num_hidden_layers=2`` etc. override it)."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape '{shape}'; known: {', '.join(SHAPES)}")
    return LlamaConfig(**{**SHAPES[shape], "max_position_embeddings": 131072, **overrides})


def random_tensors(model: nn.Module, device: torch.device, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every weight of an :func:`empty_model`, generated on ``device``.

    Norm weights are ones, biases zeros, everything else N(0, 0.02) (Llama's init).
    Generated in bf16, the dtype of real checkpoints.
    """
    generator = torch.Generator(device).manual_seed(seed)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    shapes.update(
        {
            f"{n}.weight": torch.Size((m.out_features, m.in_features))
            for n, m in model.named_modules()
            if isinstance(m, NF4Linear)
        }
    )
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape, device=device, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, device=device, dtype=torch.bfloat16)
            yield name, t.normal_(0.0, 0.02, generator=generator)


def build_random_quantized(
    config,
    device: torch.device | str,
    compute_dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    progress: bool = True,
    keep_on: torch.device | str | None = None,
) -> nn.Module:
    """An NF4 model of ``config``'s shape with random weights, never holding more than one bf16 tensor.

    The tensors are generated and quantized on ``device``; the model is kept on ``keep_on``
    (default: ``device``).
    """
    device = torch.device(device)
    model = empty_model(config, compute_dtype, attn_implementation)
    materialize(model, random_tensors(model, device, seed), device, compute_dtype, progress, keep_on)
    model.requires_grad_(False)
    return model
