"""The base weights of the merge, one decoder layer at a time, in fp32 on the device.

``--merge-into nf4`` reads them from the NF4 model (what training saw), ``--merge-into
original`` from the original checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from qlora_kit.model.sources import ModelSource, ModelSourceError, iter_tensors
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.quant.nf4 import dequantize_nf4


class BaseWeights(Protocol):
    def get(self, names: Sequence[str]) -> dict[str, Tensor]:
        """The named base tensors in fp32 on the device."""


class NF4Weights:
    """Base weights from an NF4 model (what training saw), each linear dequantized when asked for.

    The NF4 model may sit on the CPU: a tensor moves to the device only to be dequantized.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.nf4 = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
        self.params = dict(model.named_parameters())

    def get(self, names: Sequence[str]) -> dict[str, Tensor]:
        out = {}
        for name in names:
            if name in self.nf4:
                out[name] = dequantize_nf4(self.nf4[name].nf4_weight.to(self.device), torch.float32)
            else:
                out[name] = self.params[name].detach().to(self.device, torch.float32, copy=True)
        return out


class CheckpointWeights:
    """Base weights streamed from the original checkpoint (``iter_tensors``), in its own order.

    Tensors that arrive before they are asked for wait in CPU memory: with a GGUF file
    (stored layer by layer) that is nothing; with safetensors shards whose names sort
    alphabetically (layers 1, 10, 11, ..., 19, 2) it can be about ten layers.
    """

    def __init__(self, source: ModelSource, device: torch.device) -> None:
        self.source, self.device = source, device
        self._stream = iter_tensors(source)
        self._pending: dict[str, Tensor] = {}

    def get(self, names: Sequence[str]) -> dict[str, Tensor]:
        if not all(n in self._pending for n in names):
            for name, tensor in self._stream:  # resumes where the previous call stopped
                self._pending[name] = tensor
                if all(n in self._pending for n in names):
                    break
        absent = [n for n in names if n not in self._pending]
        if absent:
            raise ModelSourceError(f"the checkpoint of {self.source.name} has no tensor {absent[0]}")
        return {n: self._pending.pop(n).to(self.device, torch.float32) for n in names}
