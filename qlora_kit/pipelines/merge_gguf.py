"""``qlora-kit merge --quantize gguf``: a GGUF file type as a merge pass, and its output directory.

    merged_model (layerwise.py) with a GGUFSpec      the merged fp32 tensors, a decoder layer at a time
        (--imatrix: quantize.py's importance_layer)  + each linear's importance, mean x² of its input
    -> GGUFDirectoryWriter.add -> GGUFExport.add     rounded to the file type's mixture, written at its offset
    -> read_back                                     the file's tensors dequantized by gguf's reader: the
                                                     model the report evaluates

``DIR`` is written as ``DIR.partial-<pid>`` (the GGUF file inside it first as
``<file>.partial-<pid>``) and renamed at the end, as the safetensors checkpoints are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from qlora_kit.pipelines.export import PartialOutputDir
from qlora_kit.pipelines.export_gguf import GGUFExport, read_gguf_state
from qlora_kit.pipelines.quantize import ImportanceWeighted
from qlora_kit.quant.gguf_mix import FILE_TYPES

log = logging.getLogger(__name__)

GGUF_TYPES = tuple(FILE_TYPES)  # f16, bf16, q8_0, q4_0, ..., q6_k
MODELFILE = "Modelfile"  # `ollama create NAME -f DIR/Modelfile`


@dataclass(frozen=True)
class GGUFSpec:
    """The GGUF export as a merge pass: a file type of ``quant.gguf_mix``, with or without llama.cpp's imatrix."""

    gguf_type: str
    imatrix: bool = False

    method = "gguf"  # the driver's LAYER_PASSES key (a class attribute: not a field of the report)

    @property
    def label(self) -> str:
        return f"GGUF {self.gguf_type}" + (" (imatrix)" if self.imatrix else "")

    @property
    def checkpoint(self) -> str:
        return "gguf"

    @property
    def calibrated(self) -> bool:
        """The imatrix needs calibration activations; plain rounding does not."""
        return self.imatrix


class GGUFDirectoryWriter(PartialOutputDir):
    """Writes ``DIR/<name>-<type>.gguf``, a Modelfile and the report files; use it as a context manager.

    The interface of ``export.CheckpointWriter``, and its partial directory (``export.PartialOutputDir``):
    ``add`` takes full-name tensors as the driver yields them (:class:`ImportanceWeighted` for
    linears with importance), ``write_json`` a file beside the model, ``finish`` publishes ``DIR``;
    leaving the ``with`` block on an exception deletes the partial directory. ``read_back`` completes the GGUF file and returns its tensors
    dequantized, for the evaluation.
    """

    def __init__(
        self, out: str | Path, config: Any, tokenizer: Any, spec: GGUFSpec, name: str, overwrite: bool = False
    ) -> None:
        super().__init__(out, overwrite)
        self.config = config
        self.file_name = f"{name}-{spec.gguf_type}.gguf"
        try:
            self.export = GGUFExport(
                self.partial / self.file_name, config, tokenizer, spec.gguf_type, name=name, imatrix=spec.imatrix
            )
        except BaseException:
            super().abort()
            raise
        self._file_done = False

    def add(self, tensors: Mapping[str, Tensor | ImportanceWeighted]) -> None:
        """Round and write a part of the model (a layer, the embeddings, the final norm)."""
        plain, importance = {}, {}
        for name, value in tensors.items():
            if isinstance(value, ImportanceWeighted):
                plain[name], importance[name] = value.weight, value.importance
            else:
                plain[name] = value
        self.export.add(plain, importance or None)

    def _complete_file(self) -> Path:
        if not self._file_done:
            self.export.finish()
            self._file_done = True
        return self.partial / self.file_name

    def read_back(self) -> dict[str, Tensor]:
        """The GGUF file's tensors as a transformers state dict (float32), once every tensor is in."""
        return read_gguf_state(self._complete_file(), self.config)

    def finish(
        self, config: Any = None, tokenizer: Any = None, generation_config: Any = None, quantization_config=None
    ):
        """Complete the GGUF file, write the Modelfile and publish ``DIR``.

        The arguments of ``CheckpointWriter.finish`` are accepted and unused: the GGUF file holds
        the config, the tokenizer and the chat template itself.
        """
        self._complete_file()
        (self.partial / MODELFILE).write_text(f"FROM ./{self.file_name}\n")
        self.publish()
        log.info("wrote %s", self.out / self.file_name)
        return self.out

    @property
    def path(self) -> Path:
        """Where the GGUF file is once ``finish`` has published the directory."""
        return self.out / self.file_name

    def abort(self) -> None:
        """Delete the partial directory (and the partial GGUF file in it)."""
        if not self._file_done:
            self.export.abort()
        super().abort()
