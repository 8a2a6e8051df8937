"""Checkpoint writers: merged bf16, GPTQ (v1 layout) and AWQ (gemm layout), as docs/formats.md lists them.

Tensors arrive a decoder layer at a time and go into safetensors shards as they come;
a shard is written once it holds ``max_shard_bytes``, so the writer holds at most one
shard in memory. Quantized linears arrive as :class:`IntQuantWeight` and are packed
under transformers' module names (``model.layers.N.self_attn.q_proj.qweight`` ...);
every other tensor (embeddings, norms, lm_head, biases) is stored in bf16 for the merged
checkpoint and in fp16 for GPTQ/AWQ, the dtype their loaders expect.

Everything is written into ``DIR.partial-<pid>`` beside ``DIR`` and renamed to ``DIR``
only once complete, so an interrupted run never leaves a ``DIR`` that looks like a model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qlora_kit.errors import UserInputError, saving_to
from qlora_kit.quant.intq import IntQuantWeight
from qlora_kit.quant.packing import marlin_compatible, pack_awq_gemm, pack_gptq_v1

log = logging.getLogger(__name__)

FORMATS = ("bf16", "gptq", "awq")
_DTYPES = {"bf16": torch.bfloat16, "gptq": torch.float16, "awq": torch.float16}
DEFAULT_SHARD_BYTES = 2 * 2**30


class ExportError(UserInputError):
    """An output directory or tensor that cannot be written; the message says which and why."""


def gptq_quantization_config(
    bits: int, group_size: int, sym: bool, desc_act: bool, damp_percent: float
) -> dict[str, Any]:
    """``quantization_config`` of a GPTQ v1 checkpoint (config.json and quantize_config.json)."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": damp_percent,
        "true_sequential": True,
        "checkpoint_format": "gptq",
        "static_groups": False,
    }


def awq_quantization_config(bits: int, group_size: int) -> dict[str, Any]:
    """``quantization_config`` of an AWQ gemm checkpoint."""
    return {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def marlin_problems(shapes: Mapping[str, tuple[int, int]], group_size: int, symmetric: bool) -> list[str]:
    """Why vLLM's Marlin kernels cannot serve some linears, one line per module name and shape.

    ``shapes``: module path -> (out N, in K). Each line names the first layer where it
    happens. AWQ's Marlin kernel takes zero points, so pass ``symmetric=True`` for AWQ.
    """
    problems, seen = [], set()
    for path, (n, k) in shapes.items():
        key = (path.rpartition(".")[2], n, k)
        if key in seen or marlin_compatible(k, n, group_size, symmetric):
            continue
        seen.add(key)
        reasons = [
            text
            for failed, text in (
                (not symmetric, "symmetric quantization (--sym)"),
                (group_size not in (-1, 32, 64, 128), "group size -1, 32, 64 or 128"),
                (k % 128 != 0, f"in_features divisible by 128 (K={k})"),
                (n % 64 != 0, f"out_features divisible by 64 (N={n})"),
            )
            if failed
        ]
        problems.append(
            f"{path} [N={n}, K={k}] (and every layer's {key[0]} of this shape): vLLM's Marlin kernel needs "
            f"{', '.join(reasons)}; vLLM serves it with a slower kernel"
        )
    return problems


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a directory that holds something, unless ``overwrite``."""
    if out.is_file():
        raise ExportError(f"--out {out} is a file; name a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a model (config.json)" if (out / "config.json").exists() else f"{len(list(out.iterdir()))} entries"
        raise ExportError(f"--out {out} already holds {what}; pass --overwrite to replace it")


def remove_stale_partials(out: Path) -> None:
    """Delete the ``out.partial-<pid>`` directories of writers that were killed (their process is gone)."""
    for stale in out.parent.glob(f"{out.name}.partial-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _process_exists(int(pid)):
            log.info("removing %s, left by a merge that was killed", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class PartialOutputDir:
    """An output directory written as ``out.partial-<pid>`` beside ``out`` and renamed to ``out`` by
    :meth:`publish`; a context manager whose ``with`` block, left on an exception (Ctrl-C included),
    deletes the partial directory. Made only after :func:`check_output_dir` accepts ``out``."""

    def __init__(self, out: str | Path, overwrite: bool) -> None:
        self.out = Path(out)
        check_output_dir(self.out, overwrite)
        self.partial = self.out.with_name(f"{self.out.name}.partial-{os.getpid()}")
        remove_stale_partials(self.out)
        if self.partial.exists():  # left by an earlier process that had our pid
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def write_json(self, name: str, obj: Any) -> None:
        """A JSON file beside the model (e.g. report.json)."""
        (self.partial / name).write_text(json.dumps(obj, indent=2) + "\n")

    def publish(self) -> None:
        """Rename the partial directory to ``out`` (replacing an empty or --overwrite ``out``)."""
        if self.out.exists():  # empty, or --overwrite: checked when the writer was made
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
            os.rename(self.partial, self.out)
            shutil.rmtree(old)
        else:
            os.rename(self.partial, self.out)

    def abort(self) -> None:
        """Delete the partial directory."""
        shutil.rmtree(self.partial, ignore_errors=True)


class CheckpointWriter(PartialOutputDir):
    """Writes one checkpoint (``fmt``: bf16, gptq or awq) shard by shard; use it as a context manager.

    ``add`` takes full tensor names: ``...q_proj.weight`` -> an IntQuantWeight for gptq/awq
    (a float tensor for bf16); any other name -> a float tensor. ``finish`` writes config,
    tokenizer and generation config and renames the partial directory to ``out``; leaving
    the ``with`` block on an exception (Ctrl-C included) deletes the partial directory.
    """

    def __init__(
        self, out: str | Path, fmt: str, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
        super().__init__(out, overwrite)
        self.fmt = fmt
        self.dtype = _DTYPES[fmt]
        self.max_shard_bytes = max_shard_bytes
        self._shard: dict[str, Tensor] = {}
        self._shard_bytes = 0
        self._files: list[str] = []
        self._weight_map: dict[str, str] = {}
        self._total_bytes = 0

    def add(self, tensors: Mapping[str, Tensor | IntQuantWeight]) -> None:
        """Queue tensors for the current shard; writes the shard once it is full."""
        for name, value in tensors.items():
            if isinstance(value, IntQuantWeight):
                self._put_packed(name, value)
            else:
                self._put(name, self._cast(name, value))
        if self._shard_bytes >= self.max_shard_bytes:
            self._flush()

    def _put_packed(self, name: str, w: IntQuantWeight) -> None:
        if self.fmt == "bf16" or not name.endswith(".weight"):
            raise ValueError(f"{name}: a quantized weight cannot go into a {self.fmt} checkpoint")
        prefix = name.removesuffix(".weight")
        packed = pack_gptq_v1(w) if self.fmt == "gptq" else pack_awq_gemm(w)
        for key, t in packed.items():
            self._put(f"{prefix}.{key}", t.cpu())

    def _cast(self, name: str, t: Tensor) -> Tensor:
        out = t.detach().to("cpu", self.dtype)
        if not torch.isfinite(out).all() and torch.isfinite(t).all():
            raise ExportError(
                f"tensor {name} (max |x| = {t.abs().max().item():.4g}) overflows {self.dtype} "
                f"in the {self.fmt} checkpoint"
            )
        return out

    def _put(self, name: str, t: Tensor) -> None:
        if name in self._weight_map or name in self._shard:
            raise ValueError(f"tensor {name} added twice")
        self._shard[name] = t.contiguous()
        self._shard_bytes += t.numel() * t.element_size()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._shard:
            return
        name = f"model-{len(self._files) + 1:05d}.safetensors"
        with saving_to(self.out):  # safetensors reports a full disk without the path
            save_file(self._shard, str(self.partial / name), metadata={"format": "pt"})
        self._files.append(name)
        self._weight_map.update(dict.fromkeys(self._shard, name))
        self._total_bytes += self._shard_bytes
        self._shard, self._shard_bytes = {}, 0

    def finish(self, config, tokenizer=None, generation_config=None, quantization_config: dict | None = None) -> Path:
        """Write the last shard, the shard index, config, tokenizer and generation config; publish ``out``."""
        self._flush()
        self._name_shards()
        config = copy.deepcopy(config)
        config.dtype = self.dtype
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # a base that was itself quantized
        config.save_pretrained(self.partial)
        if quantization_config is not None:
            path = self.partial / "config.json"
            data = json.loads(path.read_text())
            data["quantization_config"] = quantization_config
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            if quantization_config["quant_method"] == "gptq":
                self.write_json("quantize_config.json", quantization_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.partial)
        if generation_config is not None:
            generation_config.save_pretrained(self.partial)
        self.publish()
        log.info(
            "wrote %s (%s checkpoint, %d shard%s)",
            self.out,
            self.fmt,
            len(self._files),
            "" if len(self._files) == 1 else "s",
        )
        return self.out

    def _name_shards(self) -> None:
        """transformers' names: model.safetensors alone, or model-0000i-of-0000n + index."""
        if not self._files:
            raise ValueError("no tensors were added to the checkpoint")
        if len(self._files) == 1:
            os.rename(self.partial / self._files[0], self.partial / "model.safetensors")
            return
        n = len(self._files)
        final = {f: f"model-{i:05d}-of-{n:05d}.safetensors" for i, f in enumerate(self._files, start=1)}
        for old, new in final.items():
            os.rename(self.partial / old, self.partial / new)
        weight_map = {name: final[f] for name, f in sorted(self._weight_map.items())}
        self.write_json(
            "model.safetensors.index.json", {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        )
