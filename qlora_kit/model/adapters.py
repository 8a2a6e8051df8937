"""Put LoRA on a model's decoder linears, and save/load the adapters in PEFT's format.

PEFT's layout: ``adapter_config.json`` (a ``peft.LoraConfig``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight``
and ``...lora_B.weight``, so ``peft.PeftModel.from_pretrained`` loads our adapters onto a
stock transformers model. Reading goes through one parser of those keys,
:func:`read_lora_weights`, whether into a model (resuming, evaluation) or for merging
(:func:`read_adapter`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from qlora_kit.errors import UserInputError
from qlora_kit.model.fsdp import full_tensor, shard_like
from qlora_kit.modules.lora import LoRALinear, NF4LoRALinear, lora_scale
from qlora_kit.modules.nf4_linear import NF4Linear

if TYPE_CHECKING:
    from qlora_kit.config import Recipe

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECIPE_FILE = "recipe.yaml"  # what training writes beside the adapter
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
    fused: bool = True,
) -> list[str]:
    """Wrap the targeted decoder linears in LoRA layers; returns the wrapped module paths.

    ``target_modules``: ``"all-linear"`` or names matched against the last part of each
    module path (``q_proj`` matches ``model.layers.3.self_attn.q_proj``). ``fused``: an NF4
    base gets :class:`NF4LoRALinear` (base and adapter in one autograd function) when there
    is no dropout; ``False``, or any other base: :class:`LoRALinear`, plain autograd.
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
        base = linears[name]
        if fused and dropout == 0 and isinstance(base, NF4Linear):
            layer = NF4LoRALinear(base, r, alpha, use_rslora)
        else:
            layer = LoRALinear(base, r, alpha, dropout, use_rslora)
        setattr(model.get_submodule(parent), child, layer)
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


_LORA_KEY = re.compile(re.escape(_PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight")


def read_lora_weights(directory: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The one parser of PEFT's keys: module path -> (lora_A [r, K], lora_B [N, r]), as stored.

    Every tensor must be a ``base_model.model.<module>.lora_A/B.weight``, and every module must
    have both, of one rank.
    """
    path = Path(directory) / ADAPTER_WEIGHTS
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in read_adapter_weights(directory).items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise AdapterError(
                f"{path}: unexpected tensor '{key}' (expected base_model.model.<module>.lora_A/B.weight)"
            )
        parts.setdefault(match[1], {})[match[2]] = t
    lora = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: '{module}' has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{path}: '{module}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}: ranks differ"
            )
        lora[module] = (a, b)
    if not lora:
        raise AdapterError(f"{path} holds no LoRA weights")
    return lora


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy the adapter weights of ``directory`` into the model's LoRA modules (under FSDP, each its slice)."""
    set_lora_weights(model, read_lora_weights(directory), Path(directory) / ADAPTER_WEIGHTS)


def set_lora_weights(model: nn.Module, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], where: str | Path) -> None:
    """Copy parsed LoRA weights (:func:`read_lora_weights`, read from ``where``) into the model's LoRA modules.

    Every LoRA module must receive both of its weights with matching shapes.
    """
    modules = lora_modules(model)
    missing, unexpected = sorted(set(modules) - set(lora)), sorted(set(lora) - set(modules))
    if missing or unexpected:
        raise AdapterError(f"{where} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, m in modules.items():
            for ab, value in zip("AB", lora[name]):
                param = getattr(m, f"lora_{ab}").weight
                if value.shape != param.shape:
                    raise AdapterError(
                        f"{where}: '{_PEFT_PREFIX}{name}.lora_{ab}.weight' has shape {tuple(value.shape)}, "
                        f"the model has {tuple(param.shape)}"
                    )
                param.copy_(shard_like(value, param))


@dataclass
class Adapter:
    """LoRA weights of an adapter directory: module path -> (A [r, K], B [N, r]), fp32 on the CPU."""

    directory: Path
    scaling: float
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: dict
    base: str
    gguf_file: str | None
    recipe: Recipe | None

    def delta(self, path: str, device: torch.device) -> torch.Tensor | None:
        """scale * B @ A in fp32 for the linear at ``path``; None when it has no adapter."""
        if path not in self.lora:
            return None
        a, b = self.lora[path]
        return self.scaling * (b.to(device) @ a.to(device))


def read_adapter(directory: str | Path) -> Adapter:
    """Read and check a PEFT LoRA adapter directory for merging (plus the recipe.yaml that training wrote)."""
    from qlora_kit.config import load_recipe

    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {directory} does not exist")
    config = read_adapter_config(directory)
    unsupported = {
        "use_dora": config.get("use_dora"),
        "fan_in_fan_out": config.get("fan_in_fan_out"),
        "rank_pattern": config.get("rank_pattern"),
        "alpha_pattern": config.get("alpha_pattern"),
        "modules_to_save": config.get("modules_to_save"),
    }
    used = [key for key, value in unsupported.items() if value]
    if used:
        raise AdapterError(f"{directory}/adapter_config.json sets {used}, which merging does not support")
    lora = {module: (a.float(), b.float()) for module, (a, b) in read_lora_weights(directory).items()}
    recipe = load_recipe(directory / RECIPE_FILE) if (directory / RECIPE_FILE).is_file() else None
    base = recipe.model.name_or_path if recipe else config.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{directory} names no base model (no recipe.yaml, no base_model_name_or_path): pass --base")
    scaling = lora_scale(config["r"], config["lora_alpha"], config.get("use_rslora", False))
    return Adapter(directory, scaling, lora, config, base, recipe.model.gguf_file if recipe else None, recipe)
