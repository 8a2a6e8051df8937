"""Put LoRA on a model's decoder linears, and save/load the adapters in PEFT's format.

PEFT's layout: ``adapter_config.json`` (a ``peft.LoraConfig``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight``
and ``...lora_B.weight``, so ``peft.PeftModel.from_pretrained`` loads our adapters onto a
stock transformers model.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from qlora_kit.errors import UserInputError
from qlora_kit.model.fsdp import full_tensor, shard_like
from qlora_kit.modules.lora import LoRALinear
from qlora_kit.modules.nf4_linear import NF4Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class AdapterError(UserInputError):
    """An adapter directory that does not fit the model; the message says what is wrong."""


def _decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (NF4Linear, nn.Linear))
        and ".layers." in f".{name}"
        and not isinstance(m, LoRALinear)
        and not name.endswith((".lora_A", ".lora_B"))
    }


def add_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
    use_rslora: bool = False,
) -> list[str]:
    """Wrap the targeted decoder linears in :class:`LoRALinear`; returns the wrapped module paths.

    ``target_modules``: ``"all-linear"`` or names matched against the last part of each
    module path (``q_proj`` matches ``model.layers.3.self_attn.q_proj``).
    """
    linears = _decoder_linears(model)
    if target_modules == "all-linear":
        chosen = list(linears)
    else:
        available = sorted({name.rpartition(".")[2] for name in linears})
        unknown = [t for t in target_modules if t not in available]
        if unknown:
            raise AdapterError(f"lora.target_modules: no module named {unknown} in the model; available: {available}")
        chosen = [name for name in linears if name.rpartition(".")[2] in target_modules]
    for name in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linears[name], r, alpha, dropout, use_rslora))
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear, without wrapper prefixes (DDP's ``module.``)."""
    return {name.removeprefix("module."): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names; under FSDP gathered whole (every process must call it)."""
    sd = {}
    for name, m in lora_modules(model).items():
        sd[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = full_tensor(m.lora_A.weight.detach())
        sd[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = full_tensor(m.lora_B.weight.detach())
    return sd


def peft_config(model: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool, base_model: str):
    """The ``peft.LoraConfig`` describing the adapters on ``model``."""
    from peft import LoraConfig

    targets = sorted({name.rpartition(".")[2] for name in lora_modules(model)})
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=use_rslora,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def save_adapter(model: nn.Module, directory: str | Path, config, write: bool = True) -> None:
    """Write adapter_config.json and adapter_model.safetensors (each file replaced atomically).

    Under FSDP every process must call it (the sharded weights are gathered); only those
    with ``write`` write the files.
    """
    from safetensors.torch import save_file

    state_dict = lora_state_dict(model)
    if not write:
        return
    tensors = {k: v.to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / ADAPTER_WEIGHTS, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    config_dict = config.to_dict()
    config_dict["target_modules"] = sorted(config_dict["target_modules"])
    _atomic_write(directory / ADAPTER_CONFIG, lambda path: Path(path).write_text(json.dumps(config_dict, indent=2)))


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary file beside ``path`` and rename it over ``path``: a crash leaves the old file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_adapter_config(directory: str | Path) -> dict:
    """adapter_config.json as a dict, with a clear error when it is missing or not a LoRA config."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"no {ADAPTER_CONFIG} in {directory}: not an adapter directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path} is not valid JSON: {e}") from e
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}, only LORA adapters are supported")
    return config


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors as a dict, with a clear error when it is missing or unreadable."""
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"no {ADAPTER_WEIGHTS} in {directory}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise AdapterError(f"cannot read {path}: {e}") from e


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy the adapter weights of ``directory`` into the model's LoRA modules (under FSDP, each its slice).

    Every LoRA module must receive both of its weights with matching shapes.
    """
    path = Path(directory) / ADAPTER_WEIGHTS
    sd = read_adapter_weights(directory)
    modules = lora_modules(model)
    expected = {
        f"{_PEFT_PREFIX}{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight
        for name, m in modules.items()
        for ab in "AB"
    }
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, param in expected.items():
            if sd[key].shape != param.shape:
                raise AdapterError(
                    f"{path}: '{key}' has shape {tuple(sd[key].shape)}, the model has {tuple(param.shape)}"
                )
            param.copy_(shard_like(sd[key], param))
