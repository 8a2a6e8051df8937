"""Calibration activations, carried from decoder layer to decoder layer.

The hidden states ([samples, seq_len, hidden] in the compute dtype) are kept in chunks of
whole samples, on the device, or on the CPU when they would take more than a quarter of the
free device memory (then each chunk moves to the device while a layer runs on it). The layer
passes read them (``inputs_of``, ``record``); only the driver replaces them by a layer's
outputs (``advance``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger("qlora_kit")

CHUNK_TOKENS = 16384  # calibration tokens per layer call


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward pass."""


def call_input(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a decoder layer or block is called with (positionally or as ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


class Activations:
    """The calibration hidden states entering the current decoder layer, in chunks of whole samples.

    ``hidden[j]`` lives on ``store`` and moves to ``device`` while a layer runs on it;
    ``kwargs[j]`` is what the model passes every decoder layer besides the hidden states
    (rotary embeddings, mask, positions), captured once at the first layer.
    """

    def __init__(self, hidden: list[Tensor], kwargs: list[dict], device: torch.device, store: torch.device) -> None:
        self.hidden, self.kwargs, self.device, self.store = hidden, kwargs, device, store

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, ids: Tensor, device: torch.device) -> Activations:
        """Run ``model`` (embeddings materialized, decoder layers possibly on meta) up to its first layer."""
        dtype = model.get_input_embeddings().weight.dtype
        per_chunk = max(1, CHUNK_TOKENS // ids.shape[1])
        nbytes = ids.numel() * model.config.hidden_size * dtype.itemsize
        store = device
        if device.type == "cuda" and nbytes > torch.cuda.mem_get_info(device)[0] / 4:
            store = torch.device("cpu")
        log.info("calibration activations: %.2f GiB on %s", nbytes / 2**30, store)
        captured = []

        def catch(module, args, kwargs):
            captured.append((call_input(args, kwargs), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            raise _StopForward

        handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for chunk in ids.split(per_chunk):
                try:
                    model.model(input_ids=chunk.to(device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return cls([h.to(store) for h, _ in captured], [kw for _, kw in captured], device, store)

    @torch.no_grad()
    def inputs_of(self, layer: nn.Module, module: nn.Module) -> Iterator[Tensor]:
        """The input of ``module`` for each chunk; the layer runs only as far as ``module``."""
        seen = []

        def stop(mod, args):
            seen.append(args[0])
            raise _StopForward

        handle = module.register_forward_pre_hook(stop)
        try:
            for hidden, kwargs in zip(self.hidden, self.kwargs):
                try:
                    layer(hidden.to(self.device), **kwargs)
                except _StopForward:
                    pass
                yield seen.pop()
        finally:
            handle.remove()

    @torch.no_grad()
    def record(self, layer: nn.Module, names: Sequence[str], max_tokens: int) -> dict[str, list[tuple[tuple, dict]]]:
        """The (args, kwargs) of every call of the named submodules, over the first chunks holding ``max_tokens``."""
        calls: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in names}
        handles = [
            layer.get_submodule(name).register_forward_pre_hook(
                lambda m, args, kwargs, name=name: calls[name].append((args, kwargs)), with_kwargs=True
            )
            for name in names
        ]
        tokens = 0
        try:
            for hidden, kwargs in zip(self.hidden, self.kwargs):
                if tokens >= max_tokens:
                    break
                layer(hidden.to(self.device), **kwargs)
                tokens += hidden.shape[0] * hidden.shape[1]
        finally:
            for handle in handles:
                handle.remove()
        return calls

    @torch.no_grad()
    def run(self, layer: nn.Module) -> None:
        """Run the layer on every chunk for its hooks (statistics), keeping the inputs as they are."""
        for hidden, kwargs in zip(self.hidden, self.kwargs):
            layer(hidden.to(self.device), **kwargs)

    @torch.no_grad()
    def advance(self, layer: nn.Module) -> None:
        """Replace every chunk by the layer's output: the next layer's inputs."""
        for j, (hidden, kwargs) in enumerate(zip(self.hidden, self.kwargs)):
            self.hidden[j] = layer(hidden.to(self.device), **kwargs).to(self.store)
