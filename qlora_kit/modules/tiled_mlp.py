"""Tiled MLP: a decoder MLP run over chunks of tokens, its ``[tokens, intermediate]`` tensors never whole.

A Llama-family MLP, ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with LoRA on its projections,
acts on each token on its own, so running it chunk by chunk along the tokens gives the same
output. :class:`_TiledMLP` does that in forward keeping only its input; backward recomputes each
chunk with gradients and backpropagates it at once. At most one chunk's intermediates
(gate, up and SwiGLU outputs, and what LoRA saves for its backward: ``[chunk, intermediate]``
each) exist at a time, in the forward pass, in a gradient checkpoint's recomputation (which
re-enters the function) and in backward. The price is one more forward of the MLP per step,
unless the MLP is marked as unread in the recompute (:mod:`qlora_kit.modules.unread`): a
checkpoint's recompute then only saves the input, since this backward recomputes every chunk.
This is the TiledMLP of Arctic Long Sequence Training (Bekman et al. 2025), Unsloth's tiled MLP.

The gradients of the MLP's trainable tensors (the LoRA A and B) are summed over the chunks here
and returned as the function's gradients, so autograd accumulates each of them once per backward,
as from the untiled MLP: hooks on gradient accumulation (optimizer-in-backward, DDP, FSDP) see
one gradient, not one per chunk.

Randomness: with ``lora.dropout > 0`` the MLP's LoRA draws dropout masks, chunk by chunk; the
RNG state at the start of the forward is restored for the recomputation, so backward sees the
masks the forward used. The autocast settings of the forward are restored too.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

from qlora_kit.modules.unread import MARK, output_unread

log = logging.getLogger(__name__)

AUTO = "auto"
# "auto": up to this many tokens per call the MLP's intermediates are small enough next to the rest
# of a layer's activations that tiling would mostly cost its extra forward; above it they are what
# fills the GPU (an 8B model's [tokens, 14336] bf16 tensor is 1.75 GiB at 64k tokens, 3.5 GiB at
# 128k). Measured on an H200 in 24 GB: at 65,536 tokens the untiled MLP fits and tiling costs 9%.
AUTO_MIN_TOKENS = 65536
# Chunks of 8192 tokens keep the projections' GEMMs large enough to run at full speed.
AUTO_CHUNK_TOKENS = 8192

_auto_logged = False


def check_chunk_tokens(chunk_tokens: int | str) -> None:
    """Raise ValueError unless ``chunk_tokens`` is ``"auto"`` or a positive int."""
    if chunk_tokens != AUTO and (
        isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0
    ):
        raise ValueError(f"the MLP chunk length must be a positive number of tokens or 'auto', got {chunk_tokens!r}")


def chunk_length(chunk_tokens: int | str, tokens: int) -> int | None:
    """The chunk length a call on ``tokens`` tokens runs in; None: untiled (the call fits in one chunk).

    ``chunk_tokens``: a number of tokens, or ``"auto"`` (chunks of :data:`AUTO_CHUNK_TOKENS` for
    calls of more than :data:`AUTO_MIN_TOKENS` tokens).
    """
    if chunk_tokens == AUTO:
        return AUTO_CHUNK_TOKENS if tokens > AUTO_MIN_TOKENS else None
    return chunk_tokens if chunk_tokens < tokens else None


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _cast(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor | None:
    return None if grad is None else grad.to(param.dtype)


class _TiledMLP(torch.autograd.Function):
    """``mlp_forward`` over chunks of ``chunk`` tokens of ``x``; ``params``: the tensors of it that train."""

    @staticmethod
    def forward(ctx, mlp_forward, chunk: int, unread: bool, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.mlp_forward, ctx.chunk, ctx.params, ctx.device = mlp_forward, chunk, params, x.device
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x)
        if unread:  # a recompute: backward recomputes every chunk itself, from x alone
            return x.new_empty(x.shape)  # a decoder MLP's output is added to its input: the same shape
        rows = x.reshape(-1, x.shape[-1])
        out = None
        for start in range(0, rows.shape[0], chunk):
            y = mlp_forward(rows[start : start + chunk])
            if out is None:
                out = y.new_empty(rows.shape[0], y.shape[-1])
            out[start : start + y.shape[0]] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        wanted = [p for p, need in zip(ctx.params, need_params) if need]
        if not need_x and not wanted:
            return (None,) * (4 + len(ctx.params))
        rows, grad_rows = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if need_x else None
        sums: list[torch.Tensor | None] = [None] * len(wanted)
        enabled, dtype = ctx.autocast
        device = ctx.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            _set_rng_state(ctx.rng, device)
            for start in range(0, rows.shape[0], ctx.chunk):
                piece = rows[start : start + ctx.chunk].detach().requires_grad_(need_x)
                with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
                    y = ctx.mlp_forward(piece)
                inputs = ([piece] if need_x else []) + wanted
                grads = torch.autograd.grad(y, inputs, grad_rows[start : start + piece.shape[0]], allow_unused=True)
                if need_x:
                    grad_x[start : start + piece.shape[0]] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        # Summed in fp32 at least: bf16 tensors (offloaded adapters) would round at every chunk.
                        g = g.to(torch.promote_types(g.dtype, torch.float32))
                        sums[i] = g if sums[i] is None else sums[i] + g
        summed = iter(zip(sums, wanted))
        grad_params = [_cast(*next(summed)) if need else None for need in need_params]
        return None, None, None, grad_x.view_as(x) if need_x else None, *grad_params


def _tiled_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    chunk = chunk_length(self.mlp_chunk_tokens, x.numel() // x.shape[-1])
    if chunk is None:
        return self.untiled_forward(x)
    global _auto_logged
    if self.mlp_chunk_tokens == AUTO and not _auto_logged:
        _auto_logged = True
        log.info(
            "training.mlp_chunk_tokens=auto: the MLPs run in chunks of %d tokens (calls of more than %d tokens; "
            "this one has %d)",
            chunk,
            AUTO_MIN_TOKENS,
            x.numel() // x.shape[-1],
        )
    # Read at each call: FSDP swaps the registered parameters for their gathered copies around the forward.
    params = [p for p in self.parameters() if p.requires_grad]
    return _TiledMLP.apply(self.untiled_forward, chunk, output_unread(self), x, *params)


def use_tiled_mlp(model: nn.Module, chunk_tokens: int | str) -> int:
    """Run the MLP of every decoder layer of ``model`` in chunks of ``chunk_tokens`` tokens (or ``"auto"``).

    The MLP's forward at the time of the call (the stock one, or the fused one of
    :func:`~qlora_kit.model.fused.use_fused_ops`: apply that first) is what each chunk runs.
    A decoder layer is a module with an ``mlp`` submodule. Calling it again only updates
    ``chunk_tokens``. Returns the number of MLPs tiled.

    Raises:
        ValueError: a bad ``chunk_tokens``, or ``model`` holds no decoder layer with an ``mlp``.
    """
    check_chunk_tokens(chunk_tokens)
    mlps = [m.mlp for m in model.modules() if isinstance(getattr(m, "mlp", None), nn.Module)]
    if not mlps:
        raise ValueError(f"{type(model).__name__} holds no decoder layer with an 'mlp' submodule to tile")
    for mlp in mlps:
        if not hasattr(mlp, "untiled_forward"):
            # A bound method: copy.deepcopy of the module rebinds it to the copy.
            mlp.untiled_forward = mlp.forward
            mlp.forward = types.MethodType(_tiled_forward, mlp)
            setattr(mlp, MARK, False)  # it knows the recompute's mark (modules/unread.py)
        mlp.mlp_chunk_tokens = chunk_tokens
    if chunk_tokens == AUTO:
        log.info(
            "tiled MLP on %d decoder layers: calls of more than %d tokens run in chunks of %d",
            len(mlps),
            AUTO_MIN_TOKENS,
            AUTO_CHUNK_TOKENS,
        )
    else:
        log.info("tiled MLP on %d decoder layers: chunks of %d tokens", len(mlps), chunk_tokens)
    return len(mlps)
