"""Memory levers for very large models: checkpoints offloaded to CPU memory, embeddings kept on the CPU.

With gradient checkpointing, what stays on the GPU between forward and backward is each
decoder layer's input ([batch, seq, hidden] per layer: 2.7 GB for a 65B model at seq
2048). :func:`use_offloaded_checkpointing` copies those inputs to pinned CPU memory
after the forward of each layer and back before its recomputation, on copy streams of
their own that overlap the transfers with the compute. The input embedding
table is only read by index, so :func:`offload_embeddings` keeps it in CPU memory and
sends the looked-up rows to the GPU.

With ``keep_attention``, a checkpointed layer's forward also keeps its attention output and
logsumexp in CPU memory, and the recompute in backward takes them instead of running the
attention forward again (:mod:`qlora_kit.modules.flash_attention`): the quadratic kernel runs
twice per step instead of three times. transformers' ``"sdpa"`` attention function is replaced,
once per process, by a dispatcher that does this only inside such a checkpoint (and only for
unmasked causal attention without dropout) and calls the original otherwise.

With ``keep_outputs``, it keeps the outputs of the linears its family's plan names
(:attr:`~qlora_kit.model.plans.LayerPlan.recompute_kept`: q, k, v and o) the same way, and the
recompute takes them instead of running their GEMMs (:mod:`qlora_kit.modules.kept`).
"""

from __future__ import annotations

import functools
import logging
import weakref
from contextvars import ContextVar

import torch
from torch import nn

from qlora_kit.compat import (
    checkpointed_layers,
    sdpa_attention_function,
    set_checkpoint_function,
    set_sdpa_attention_function,
)
from qlora_kit.model.recompute import keep_outputs as mark_kept_outputs
from qlora_kit.model.sources import head_dim
from qlora_kit.modules.flash_attention import AttentionFromKept, flash_forward, sdpa_kernel, supported
from qlora_kit.modules.kept import KeptOutputs, keeping

log = logging.getLogger(__name__)


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


# The smallest pinned piece an offloaded tensor is split into (see _piece_lengths).
_PIECE_MIN_BYTES = 1 << 26


def _piece_lengths(numel: int, itemsize: int) -> list[int]:
    """Element counts of the pinned pieces holding one offloaded tensor: power-of-two byte sizes, largest first,
    the last under 64 MiB. torch's caching host allocator rounds every block up to a power of two, so one
    block for a 2.8 GB checkpoint (344,064 tokens of an 8B model) would pin 4.3 GB: 137 GB for 32 layers."""
    lengths, left = [], numel * itemsize
    while left > 0:
        piece = 1 << (left.bit_length() - 1)
        if piece < _PIECE_MIN_BYTES:
            piece = left
        lengths.append(piece // itemsize)
        left -= piece
    return lengths


class _Offloaded:
    """One tensor in pinned CPU memory: written on the d2h stream, read back on the h2d stream (CUDA).

    Held as a few pieces (:func:`_piece_lengths`) so the pinned memory is about the tensor's size.
    A layer input is ``queued``: taking it starts the copy back of the layer input before it
    (in forward order). A kept attention output is not: it is one of its layer input's
    ``companions``, which come back right after the input, a layer ahead of their recompute.
    """

    def __init__(self, hidden: torch.Tensor, queued: bool = True) -> None:
        self.device, self.queued = hidden.device, queued
        self.shape, self.dtype = hidden.shape, hidden.dtype
        self.lengths = _piece_lengths(hidden.numel(), hidden.element_size())
        self.cpu = [torch.empty(n, dtype=hidden.dtype, pin_memory=hidden.is_cuda) for n in self.lengths]
        self.gpu: torch.Tensor | None = None
        self.companions: list[_Offloaded] = []
        flat = hidden.reshape(-1)
        parts = flat.split(self.lengths)
        if not hidden.is_cuda:
            for piece, part in zip(self.cpu, parts):
                piece.copy_(part)
            return
        streams = _transfers.setdefault(hidden.device, _Transfers(hidden.device))
        streams.d2h.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(streams.d2h):
            for piece, part in zip(self.cpu, parts):
                piece.copy_(part, non_blocking=True)
            self.on_cpu = torch.cuda.Event()
            self.on_cpu.record()
        # The compute stream must not reuse the memory the copy reads (hidden's, or its contiguous copy's) before it has.
        flat.record_stream(streams.d2h)
        if queued:
            streams.pending.append(weakref.ref(self))

    def prefetch(self) -> None:
        """Start the copy back to the GPU, then the companions' (CUDA only; at most once)."""
        if self.gpu is not None or self.device.type != "cuda":
            return
        streams = _transfers[self.device]
        # Allocated on the compute stream, which waits for the copy before it reads the tensor. The
        # block may have been freed by compute work still queued: the copy waits for that work too.
        self.gpu = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        streams.h2d.wait_stream(torch.cuda.current_stream(self.device))
        streams.h2d.wait_event(self.on_cpu)
        with torch.cuda.stream(streams.h2d):
            for part, piece in zip(self.gpu.view(-1).split(self.lengths), self.cpu):
                part.copy_(piece, non_blocking=True)
            self.on_gpu = torch.cuda.Event()
            self.on_gpu.record()
        for companion in self.companions:
            companion.prefetch()

    def take(self) -> torch.Tensor:
        """The tensor on its device, for the recomputation; the CPU copy is handed back to the host cache."""
        if self.device.type != "cuda":
            hidden = torch.cat(self.cpu).view(self.shape).to(self.device)
        else:
            streams = _transfers[self.device]
            if self.queued:
                streams.remove(self)
            self.prefetch()
            torch.cuda.current_stream(self.device).wait_event(self.on_gpu)
            hidden = self.gpu
            # The next layer back starts coming over while this one recomputes and backpropagates.
            following = streams.newest() if self.queued else None
            if following is not None:
                following.prefetch()
        # Freed now, not when the graph is: the next step's forward reuses the pinned buffer
        # instead of pinning fresh memory (slow, and synchronizing).
        self.cpu = self.gpu = None
        return hidden


class _KeptAttention:
    """The attention calls of one checkpointed layer's forward, for its recompute to replay.

    An entry per call, in order: the offloaded output and logsumexp with the kernel's state, or
    None for a call the kept path does not take (a mask, dropout), which the recompute runs as usual.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[_Offloaded, _Offloaded, tuple] | None] = []
        self.replaying = False

    def replay(self) -> None:
        """From now on the attention calls take the kept tensors, in order (they come back with the layer input)."""
        self.replaying = True

    def next(self) -> tuple[_Offloaded, _Offloaded, tuple] | None:
        return self.entries.pop(0)


# The kept attention of the checkpointed layer whose forward or recompute runs now; None elsewhere.
_kept_attention: ContextVar[_KeptAttention | None] = ContextVar("qlora_kit_kept_attention", default=None)


def _kept_path_takes(module, query, key, value, attention_mask, dropout, scaling, kwargs) -> bool:
    """Whether this sdpa call is plain causal attention that sdpa itself would run on a kernel the kept path runs."""
    causal = kwargs.get("is_causal") is not False and getattr(module, "is_causal", True)
    changed = any(kwargs.get(k) is not None for k in ("position_bias", "softcap")) or kwargs.get("output_attentions")
    if not causal or changed or attention_mask is not None or dropout or not query.shape[2] == key.shape[2] > 1:
        return False
    if supported(query, key, value, scaling):
        return True
    _warn_once(
        f"training.recompute_attention=false: sdpa runs {sdpa_kernel(query, key, value, scaling)} here, not a kernel "
        "the kept attention output can come from (flash, cuDNN); the checkpoints recompute attention as with true"
    )
    return False


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def _sdpa_dispatcher(original):
    """An sdpa attention function that is ``original`` except inside a checkpoint that keeps its attention."""

    @functools.wraps(original)
    def sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        kept = _kept_attention.get()
        if kept is not None and kept.replaying:
            entry = kept.next()
            if entry is not None:
                out, lse, state = entry
                return AttentionFromKept.apply(query, key, value, out.take(), lse.take(), state, scaling), None
        elif kept is not None:
            if _kept_path_takes(module, query, key, value, attention_mask, dropout, scaling, kwargs):
                out, lse, state = flash_forward(query, key, value, scaling)
                kept.entries.append((_Offloaded(out, queued=False), _Offloaded(lse, queued=False), state))
                return out, None
            kept.entries.append(None)  # the recompute runs this call as the forward did
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    sdpa_attention_forward.original = original
    return sdpa_attention_forward


class _OffloadedCheckpoint(torch.autograd.Function):
    """Recompute-in-backward (like reentrant checkpointing) with the layer input held in CPU memory.

    The CUDA RNG state and the autocast settings of the forward are restored for the
    recomputation, so dropout and mixed precision recompute exactly what the forward saw.
    With ``keep_attention``, the forward's attention outputs are kept too, and the recompute
    takes them instead of running attention again; with ``keep_outputs``, the marked linears' outputs.
    """

    @staticmethod
    def forward(ctx, run, keep_attention: bool, keep_outputs: bool, hidden: torch.Tensor, *args):
        ctx.run, ctx.args, ctx.device = run, args, hidden.device
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type))
        ctx.rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else torch.get_rng_state()
        ctx.offloaded = _Offloaded(hidden)
        ctx.kept = _KeptAttention() if keep_attention else None
        ctx.outputs = KeptOutputs(functools.partial(_Offloaded, queued=False)) if keep_outputs else None
        token = _kept_attention.set(ctx.kept)
        try:
            with torch.no_grad(), keeping(ctx.outputs):
                out = run(hidden, *args)
        finally:
            _kept_attention.reset(token)
        # Prefetched with the layer input, while the layer after it runs its backward: the copy
        # is not left to start when this layer's own recompute asks for it.
        if ctx.kept is not None:
            ctx.offloaded.companions = [kept for entry in ctx.kept.entries if entry for kept in entry[:2]]
        if ctx.outputs is not None:
            ctx.offloaded.companions += ctx.outputs.held
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        kept, ctx.kept = ctx.kept, None
        outputs, ctx.outputs = ctx.outputs, None
        if kept is not None:
            kept.replay()
        if outputs is not None:
            outputs.replaying = True
        hidden = ctx.offloaded.take().requires_grad_(True)
        ctx.offloaded = None
        enabled, dtype = ctx.autocast
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        token = _kept_attention.set(kept)
        try:
            with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
                if ctx.device.type == "cuda":
                    torch.cuda.set_rng_state(ctx.rng, ctx.device)
                else:
                    torch.set_rng_state(ctx.rng)
                with (
                    torch.enable_grad(),
                    torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled),
                    keeping(outputs),
                ):
                    out = ctx.run(hidden, *ctx.args)
        finally:
            _kept_attention.reset(token)
        torch.autograd.backward(out, grad_out)
        return (None, None, None, hidden.grad) + (None,) * len(ctx.args)


def offloaded_checkpoint(
    run, hidden: torch.Tensor, *args, keep_attention: bool = False, keep_outputs: bool = False
) -> torch.Tensor:
    """A drop-in for transformers' ``_gradient_checkpointing_func(run, hidden, *args)``."""
    if not torch.is_grad_enabled():
        # A forward without gradients (evaluation, DPO's reference pass) has no backward to offload for.
        return run(hidden, *args)
    if not hidden.requires_grad:
        # The first layer's input comes from frozen embeddings: without a grad-requiring
        # input, autograd would never call backward and its LoRA weights would get no gradient.
        hidden = hidden.detach().requires_grad_(True)
    return _OffloadedCheckpoint.apply(run, keep_attention, keep_outputs, hidden, *args)


def host_memory_available() -> int | None:
    """Bytes of CPU memory the kernel could give this process now (Linux's MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    return int(fields["MemAvailable"].split()[0]) * 1024 if "MemAvailable" in fields else None


def checkpoint_host_bytes(
    config, layers: int, tokens: int, dtype: torch.dtype, keep_attention: bool, keep_outputs: bool = False
) -> int:
    """The pinned CPU memory ``layers`` offloaded checkpoints hold at ``tokens`` tokens a step (a
    transformers config's shape): each layer's input, with ``keep_attention`` its attention output
    and float32 logsumexp, with ``keep_outputs`` its q, k, v and o projections' outputs."""
    heads, kv_heads = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    per_token = config.hidden_size * dtype.itemsize
    if keep_attention:
        per_token += heads * head_dim(config) * dtype.itemsize + heads * 4
    if keep_outputs:
        per_token += ((heads + 2 * kv_heads) * head_dim(config) + config.hidden_size) * dtype.itemsize
    return layers * tokens * per_token


def use_offloaded_checkpointing(model: nn.Module, keep_attention: bool = False, keep_outputs: bool = False) -> int:
    """Checkpoint every decoder layer with its input offloaded to CPU memory; returns the layer count.

    Call after checkpointing is enabled (``compat.enable_checkpointing``); it replaces the checkpoint function that
    transformers set on each layer. ``keep_attention``: the attention output and logsumexp
    are offloaded too and the recompute does not run attention again (sdpa attention only;
    as much CPU memory again as the layer inputs for a Llama, whose attention output is
    hidden-sized). ``keep_outputs``: so are the outputs of the plan's
    :attr:`~qlora_kit.model.plans.LayerPlan.recompute_kept` linears (NF4 linears only), whose GEMMs the
    recompute then skips (2.5 times the layer inputs' CPU memory for an 8B Llama).
    """
    layers = checkpointed_layers(model)
    if not layers:
        raise ValueError("offloaded checkpointing needs gradient checkpointing: enable it first")
    if keep_outputs and not mark_kept_outputs(model):
        raise ValueError("keeping projection outputs needs NF4 linears (training.fused_kernels=true)")
    if keep_attention:
        if model.config._attn_implementation != "sdpa":
            raise ValueError(
                f"keeping the attention output works with sdpa attention, not {model.config._attn_implementation!r}"
            )
        if not hasattr(sdpa_attention_function(), "original"):
            set_sdpa_attention_function(_sdpa_dispatcher(sdpa_attention_function()))
    checkpoint = functools.partial(offloaded_checkpoint, keep_attention=keep_attention, keep_outputs=keep_outputs)
    for layer in layers:
        set_checkpoint_function(layer, checkpoint)
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
