"""Memory levers for very large models: checkpoints offloaded to CPU memory, embeddings kept on the CPU.

With gradient checkpointing, what stays on the GPU between forward and backward is each
decoder layer's input ([batch, seq, hidden] per layer: 2.7 GB for a 65B model at seq
2048). :func:`use_offloaded_checkpointing` copies those inputs to pinned CPU memory
after the forward of each layer and back before its recomputation, on copy streams of
their own that overlap the transfers with the compute. The input embedding
table is only read by index, so :func:`offload_embeddings` keeps it in CPU memory and
sends the looked-up rows to the GPU.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from qlora_kit.compat import set_checkpoint_function


class _Transfers:
    """The copy streams of one device, and the offloaded inputs of the layers waiting for their backward.

    On CUDA the copies run on their own streams, beside the compute: a layer's input goes to
    CPU memory while the next layers compute, and comes back while the layer after it (in
    forward order) runs its backward, so neither direction waits for the other nor stalls the
    GPU. ``pending`` holds the inputs in forward order (weakly: a graph that is freed without
    a backward takes its inputs with it); backward goes through the layers in reverse, so the
    newest live one is the next to prefetch.
    """

    def __init__(self, device: torch.device) -> None:
        self.d2h, self.h2d = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self.pending: list[weakref.ref] = []

    def newest(self) -> _Offloaded | None:
        while self.pending:
            held = self.pending[-1]()
            if held is not None:
                return held
            self.pending.pop()
        return None

    def remove(self, held: _Offloaded) -> None:
        self.pending = [r for r in self.pending if r() is not None and r() is not held]


_transfers: dict[torch.device, _Transfers] = {}


class _Offloaded:
    """One layer input in pinned CPU memory: written on the d2h stream, read back on the h2d stream (CUDA)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.device = hidden.device
        self.cpu = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
        self.gpu: torch.Tensor | None = None
        if not hidden.is_cuda:
            self.cpu.copy_(hidden)
            return
        streams = _transfers.setdefault(hidden.device, _Transfers(hidden.device))
        streams.d2h.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(streams.d2h):
            self.cpu.copy_(hidden, non_blocking=True)
            self.on_cpu = torch.cuda.Event()
            self.on_cpu.record()
        # The compute stream must not reuse hidden's memory before the copy has read it.
        hidden.record_stream(streams.d2h)
        streams.pending.append(weakref.ref(self))

    def prefetch(self) -> None:
        """Start the copy back to the GPU (CUDA only; at most once)."""
        if self.gpu is not None:
            return
        streams = _transfers[self.device]
        # Allocated on the compute stream, which waits for the copy before it reads the tensor. The
        # block may have been freed by compute work still queued: the copy waits for that work too.
        self.gpu = torch.empty(self.cpu.shape, dtype=self.cpu.dtype, device=self.device)
        streams.h2d.wait_stream(torch.cuda.current_stream(self.device))
        streams.h2d.wait_event(self.on_cpu)
        with torch.cuda.stream(streams.h2d):
            self.gpu.copy_(self.cpu, non_blocking=True)
            self.on_gpu = torch.cuda.Event()
            self.on_gpu.record()

    def take(self) -> torch.Tensor:
        """The input on its device, for the recomputation; the CPU copy is handed back to the host cache."""
        if self.device.type != "cuda":
            hidden = self.cpu.to(self.device)
        else:
            streams = _transfers[self.device]
            streams.remove(self)
            self.prefetch()
            torch.cuda.current_stream(self.device).wait_event(self.on_gpu)
            hidden = self.gpu
            # The next layer back starts coming over while this one recomputes and backpropagates.
            following = streams.newest()
            if following is not None:
                following.prefetch()
        # Freed now, not when the graph is: the next step's forward reuses the pinned buffer
        # instead of pinning fresh memory (slow, and synchronizing).
        self.cpu = self.gpu = None
        return hidden


class _OffloadedCheckpoint(torch.autograd.Function):
    """Recompute-in-backward (like reentrant checkpointing) with the layer input held in CPU memory.

    The CUDA RNG state and the autocast settings of the forward are restored for the
    recomputation, so dropout and mixed precision recompute exactly what the forward saw.
    """

    @staticmethod
    def forward(ctx, run, hidden: torch.Tensor, *args):
        ctx.run, ctx.args, ctx.device = run, args, hidden.device
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type))
        ctx.rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else torch.get_rng_state()
        ctx.offloaded = _Offloaded(hidden)
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden = ctx.offloaded.take().requires_grad_(True)
        ctx.offloaded = None
        enabled, dtype = ctx.autocast
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            if ctx.device.type == "cuda":
                torch.cuda.set_rng_state(ctx.rng, ctx.device)
            else:
                torch.set_rng_state(ctx.rng)
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden, *ctx.args)
        torch.autograd.backward(out, grad_out)
        return (None, hidden.grad) + (None,) * len(ctx.args)


def offloaded_checkpoint(run, hidden: torch.Tensor, *args) -> torch.Tensor:
    """A drop-in for transformers' ``_gradient_checkpointing_func(run, hidden, *args)``."""
    if not torch.is_grad_enabled():
        # A forward without gradients (evaluation, DPO's reference pass) has no backward to offload for.
        return run(hidden, *args)
    if not hidden.requires_grad:
        # The first layer's input comes from frozen embeddings: without a grad-requiring
        # input, autograd would never call backward and its LoRA weights would get no gradient.
        hidden = hidden.detach().requires_grad_(True)
    return _OffloadedCheckpoint.apply(run, hidden, *args)


def use_offloaded_checkpointing(model: nn.Module) -> int:
    """Checkpoint every decoder layer with its input offloaded to CPU memory; returns the layer count.

    Call after ``gradient_checkpointing_enable``; it replaces the checkpoint function that
    transformers set on each layer.
    """
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    if not layers:
        raise ValueError("offloaded checkpointing needs gradient checkpointing: enable it first")
    for layer in layers:
        set_checkpoint_function(layer, offloaded_checkpoint)
    return len(layers)


class CPUEmbedding(nn.Module):
    """A frozen embedding table in CPU memory; the looked-up rows go to ``device``."""

    def __init__(self, embedding: nn.Embedding, device: torch.device) -> None:
        super().__init__()
        # A plain attribute, not a parameter: .to(device) on the model must not move it back.
        self.weight_cpu = (
            embedding.weight.detach().to("cpu").pin_memory()
            if device.type == "cuda"
            else embedding.weight.detach().cpu()
        )
        self.padding_idx, self.device = embedding.padding_idx, device
        self.num_embeddings, self.embedding_dim = self.weight_cpu.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids.cpu(), self.weight_cpu, self.padding_idx)
        return rows.to(self.device, non_blocking=True)


def offload_embeddings(lm: nn.Module) -> None:
    """Move the input embedding table of a causal LM to CPU memory (not when tied to the lm_head)."""
    embed = lm.get_input_embeddings()
    if embed.weight is lm.get_output_embeddings().weight:
        raise ValueError("the input embeddings are tied to the lm_head, which needs them on the GPU: cannot offload")
    lm.set_input_embeddings(CPUEmbedding(embed, embed.weight.device))
