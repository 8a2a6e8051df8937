"""Build a causal LM whose decoder linears are NF4, quantizing each weight as it is read.

The model skeleton is created on the meta device (no memory), every ``nn.Linear``
inside the decoder layers is swapped for an empty :class:`NF4Linear`, and then the
checkpoint's tensors are streamed in: a decoder linear's weight is moved to the
device, quantized and dropped; everything else (embeddings, norms, lm_head) is kept
in the compute dtype. Peak memory is the NF4 model plus one tensor in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from qlora_kit.kernels.dispatch import check_kernel
from qlora_kit.model.sources import ModelSource, ModelSourceError, iter_tensors, load_config, resolve_source
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.quant.nf4 import NF4Tensor, quantize_nf4

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on the CPU."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(
            f"model type '{config.model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def empty_model(config, compute_dtype: torch.dtype, attn_implementation: str = "sdpa") -> nn.Module:
    """The transformers model on the meta device, with decoder linears as empty NF4Linear layers.

    Buffers that are not in checkpoints (rotary frequencies) are created for real.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    check_supported(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, attn_implementation=attn_implementation)
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear):
                _set_submodule(layer, name, _empty_nf4_linear(module, compute_dtype))
    model.tie_weights()  # a tied lm_head is one parameter, not expected from the checkpoint
    return model


def _empty_nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype) -> NF4Linear:
    shape = torch.Size((linear.out_features, linear.in_features))
    n = shape.numel()
    n_blocks = -(-n // 64)
    meta = torch.device("meta")
    weight = NF4Tensor(
        torch.empty((n + 1) // 2, dtype=torch.uint8, device=meta),
        torch.empty(n_blocks, dtype=torch.uint8, device=meta),
        torch.empty(-(-n_blocks // 256), dtype=torch.float32, device=meta),
        torch.empty((), dtype=torch.float32, device=meta),
        shape,
        compute_dtype,
    )
    bias = None if linear.bias is None else torch.empty(linear.out_features, device=meta)
    return NF4Linear(weight, bias, compute_dtype)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def materialize(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    device: torch.device,
    compute_dtype: torch.dtype,
    progress: bool = True,
    keep_on: torch.device | str | None = None,
) -> nn.Module:
    """Fill an :func:`empty_model` from ``(name, tensor)`` pairs, quantizing decoder linears as they arrive.

    Shared by the checkpoint loader and the random-weight builder, so both produce
    exactly the same model. Raises on an unexpected name, a shape mismatch or a
    tensor the model needs that never arrived. Tensors are quantized on ``device`` and
    the model is kept on ``keep_on`` (default: ``device``): FSDP loads into CPU memory,
    so that no GPU ever holds the whole model, and shards from there.
    """
    from tqdm.auto import tqdm

    keep_on = torch.device(keep_on) if keep_on is not None else device

    expected = {name: p.shape for name, p in model.named_parameters()}
    nf4_modules = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    expected.update({name: torch.Size((m.out_features, m.in_features)) for name, m in nf4_modules.items()})
    seen: set[str] = set()
    bar = tqdm(total=len(expected), desc="loading + quantizing to NF4", unit="tensor", disable=not progress)
    for name, tensor in tensors:
        if name not in expected:
            # Older checkpoints saved the rotary buffer, some the tied copy of the embeddings.
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.config.tie_word_embeddings):
                continue
            raise ModelSourceError(f"checkpoint tensor '{name}' does not belong to this {type(model).__name__}")
        if tensor.shape != expected[name]:
            raise ModelSourceError(
                f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name])}"
            )
        if name in nf4_modules:
            nf4_modules[name].set_weight(quantize_nf4(tensor.to(device)).to(keep_on))
        else:
            module_name, _, param_name = name.rpartition(".")
            module = model.get_submodule(module_name)
            value = tensor.to(device=keep_on, dtype=compute_dtype)
            setattr(module, param_name, nn.Parameter(value, requires_grad=False))
        del tensor
        seen.add(name)
        bar.update(1)
    bar.close()
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, m in nf4_modules.items() if m.weight_packed.device.type == "meta"]
    if missing:
        raise ModelSourceError(f"the checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
    return model.to(keep_on)


def load_quantized(
    name_or_path: str | ModelSource,
    gguf_file: str | None = None,
    device: torch.device | str | None = None,
    compute_dtype: str | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    kernel: str = "auto",
    progress: bool = True,
    keep_on: torch.device | str | None = None,
) -> nn.Module:
    """Load a Llama-family causal LM with every decoder linear in NF4 + double quantization.

    ``name_or_path``: ``smollm2`` (the embedded default), a local transformers checkpoint
    directory, a ``.gguf`` file, or a hub id. Embeddings, norms and lm_head stay in
    ``compute_dtype``; every parameter is frozen. Weights are quantized on ``device`` and
    kept on ``keep_on`` (default: ``device``).
    """
    check_kernel(kernel)
    source = name_or_path if isinstance(name_or_path, ModelSource) else resolve_source(name_or_path, gguf_file)
    device = torch.device(device) if device is not None else default_device()
    if isinstance(compute_dtype, str):
        compute_dtype = resolve_compute_dtype(compute_dtype, device)
    config = load_config(source)
    model = empty_model(config, compute_dtype, attn_implementation)
    materialize(model, iter_tensors(source), device, compute_dtype, progress, keep_on)
    for m in model.modules():
        if isinstance(m, NF4Linear):
            m.kernel = kernel
    model.requires_grad_(False)
    model.eval()
    return model


def load_full_precision(
    name_or_path: str | ModelSource,
    gguf_file: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The stock transformers model with the checkpoint's weights, unquantized (a reference for evaluation).

    Reads through the same tensor stream as :func:`load_quantized`, so a GGUF file's
    weights arrive as plain tensors rather than transformers' packed GGUF modules.
    """
    from transformers import AutoModelForCausalLM

    source = name_or_path if isinstance(name_or_path, ModelSource) else resolve_source(name_or_path, gguf_file)
    config = load_config(source)
    check_supported(config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {name: tensor.to(dtype) for name, tensor in iter_tensors(source)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelSourceError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    return model.to(device).eval()


def nf4_bytes(model: nn.Module) -> int:
    """Bytes of all NF4 weights (codes, absmax codes, nested absmax, offsets)."""
    return sum(m.nf4_weight.nbytes() for m in model.modules() if isinstance(m, NF4Linear))


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of the model (NF4 weights at their packed size)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
