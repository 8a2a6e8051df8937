"""AWQ: activation-aware weight quantization (Lin et al., 2023), on tensors.

A few input channels carry much larger activations than the rest; the weights
that multiply them matter most. AWQ protects them by scaling: for a per-input-
channel s, Q(W*s) (x/s) ~= W x, and a larger s on a salient channel lowers its
relative rounding error. s = x_mean^ratio / w_mean^(1-ratio) is searched over a
grid of ratios to minimise the output error of the block that consumes x. The
1/s is folded into the op that produces x, so inference costs nothing extra.
A second search then clips each group's weight range (shrinking max|w| by up
to 50%) where that lowers the output error.

Quantization here is asymmetric with zero points (the AWQ "gemm" checkpoint).

Llama scaling groups (previous op -> consumer Linears sharing its output):
    input_layernorm          -> q_proj, k_proj, v_proj
    v_proj                   -> o_proj   (only when the shapes match, i.e. no GQA)
    post_attention_layernorm -> gate_proj, up_proj
    up_proj                  -> down_proj
Clipping is skipped for q_proj and k_proj: the q.k^T product amplifies it.

The model-level pipeline walks the decoder layers, captures each group's
input x and calls the functions below.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qlora_kit.quant.intq import find_params, group_count, quantize_dequantize, rtn_quantize


def _pseudo_quantize(w: Tensor, bits: int, group_size: int) -> Tensor:
    """Asymmetric group-wise round trip Q(w), float32."""
    return rtn_quantize(w, bits, group_size, symmetric=False).dequantize(torch.float32)


def _compute_dtype(t: Tensor) -> torch.dtype:
    # At least fp32, but keep fp64 when the caller works in fp64.
    return torch.promote_types(t.dtype, torch.float32)


@torch.no_grad()
def search_scale(
    x: Tensor,
    weights: list[Tensor],
    block_forward: Callable[[list[Tensor]], Tensor],
    bits: int = 4,
    group_size: int = 128,
    n_grid: int = 20,
) -> Tensor:
    """Best per-input-channel scale s [K] for the Linears `weights` that read `x`.

    x: the block input [..., K]; weights: the consumer weights [N_i, K];
    block_forward(ws) computes the block output with weights `ws` in place of
    `weights` (on the same input x). The loss is the MSE between the block
    output with candidate weights Q(W*s)/s and with the original weights.
    s = 1 (plain RTN) is always a candidate, so the result never loses to it.
    """
    if not weights:
        raise ValueError("search_scale needs at least one consumer weight")
    k = x.shape[-1]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(
                f"consumer weight {i} has shape {tuple(w.shape)}, expected [N, K={k}] to match x {tuple(x.shape)}"
            )
    groups = group_count(k, group_size)

    # w_mean: mean over output rows of |W|, each group normalised to [0, 1]
    # by its own max, so that channels are compared within their group.
    weight = torch.cat([w.float() for w in weights], dim=0)
    grouped = weight.abs().reshape(-1, k // groups)
    w_mean = (grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)).reshape(weight.shape).mean(0)
    x_mean = x.reshape(-1, k).float().abs().mean(0)

    org_out = block_forward(weights).float()

    def loss_of(s: Tensor) -> float:
        candidates = [(_pseudo_quantize(w.float() * s, bits, group_size) / s).to(w.dtype) for w in weights]
        return (block_forward(candidates).float() - org_out).pow(2).mean().item()

    # Duo scaling at ratio 0 is 1/w_mean, not the identity: add s = 1 explicitly.
    best_s = torch.ones_like(x_mean)
    best_loss = loss_of(best_s)
    for r in range(n_grid):
        ratio = r / n_grid
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = loss_of(s)
        if loss < best_loss:
            best_loss, best_s = loss, s
    return best_s


@torch.no_grad()
def search_clip(
    x: Tensor,
    w: Tensor,
    bits: int = 4,
    group_size: int = 128,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
) -> Tensor:
    """Best clipping threshold max_val [N, G] for each (row, group) of `w` [N, K].

    Candidates shrink the group's max|w| by i/n_grid for i < max_shrink*n_grid
    (i = 0: no clipping); each group keeps the one with the smallest error of
    its partial products x_group . w_group, over every (len(x) // n_sample_tokens)-th
    token as AutoAWQ subsamples.
    """
    if w.dim() != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"weight of shape {tuple(w.shape)} does not match input x of shape {tuple(x.shape)}")
    n, k = w.shape
    groups = group_count(k, group_size)
    g = k // groups

    x = x.reshape(-1, k).float()
    x = x[:: max(1, x.shape[0] // n_sample_tokens)]
    x = x.reshape(x.shape[0], groups, g)  # [tokens, G, g]

    def partial_products(w: Tensor) -> Tensor:
        # x_group . w_group for every row, token and group, as one batched matmul per group
        # (a broadcast product would materialize [rows, tokens, G, g]).
        return torch.einsum("tGk,rGk->rtG", x, w.squeeze(1))  # [rows, tokens, G]

    best_max_val = []
    # Rows in chunks: the search keeps [rows, tokens, G] products.
    for rows in w.float().split(64, dim=0):
        rows = rows.reshape(rows.shape[0], 1, groups, g)
        org_max_val = rows.abs().amax(dim=-1, keepdim=True)  # [rows, 1, G, 1]
        best = org_max_val.clone()
        min_errs = torch.full_like(org_max_val, float("inf"))
        org_out = partial_products(rows)
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max_val * (1 - i_s / n_grid)
            cur_w = torch.clamp(rows, -max_val, max_val)
            scale, zero = find_params(cur_w.reshape(-1, g), bits, symmetric=False)
            q_w = quantize_dequantize(cur_w.reshape(-1, g), scale, zero, bits).reshape(cur_w.shape)
            err = (partial_products(q_w) - org_out).pow(2).mean(dim=1, keepdim=True).unsqueeze(-1)
            better = err < min_errs
            min_errs[better] = err[better]
            best[better] = max_val[better]
        best_max_val.append(best.reshape(-1, groups))
    return torch.cat(best_max_val, dim=0)


def apply_clip(w: Tensor, max_val: Tensor) -> Tensor:
    """Clamp each (row, group) of `w` [N, K] to [-max_val, max_val] (max_val [N, G])."""
    n, k = w.shape
    if max_val.dim() != 2 or max_val.shape[0] != n or k % max_val.shape[1] != 0:
        raise ValueError(f"max_val of shape {tuple(max_val.shape)} does not fit a weight of shape {tuple(w.shape)}")
    groups = max_val.shape[1]
    bound = max_val.to(w.dtype).unsqueeze(-1)
    return torch.clamp(w.reshape(n, groups, k // groups), -bound, bound).reshape(n, k)


def fold_scale_into_norm(norm_weight: Tensor, s: Tensor) -> Tensor:
    """RMSNorm weight / s: the norm then outputs x/s for its consumers' W*s."""
    if norm_weight.shape != s.shape:
        raise ValueError(f"norm weight of shape {tuple(norm_weight.shape)} does not match s {tuple(s.shape)}")
    dtype = _compute_dtype(norm_weight)
    return (norm_weight.to(dtype) / s.to(norm_weight.device, dtype)).to(norm_weight.dtype)


def fold_scale_into_linear(prev_weight: Tensor, prev_bias: Tensor | None, s: Tensor) -> tuple[Tensor, Tensor | None]:
    """Divide the previous Linear's output rows (weight [K, *], bias [K]) by s."""
    if prev_weight.dim() != 2 or prev_weight.shape[0] != s.shape[0]:
        raise ValueError(
            f"previous Linear weight of shape {tuple(prev_weight.shape)} must have K={s.shape[0]} output rows"
        )
    dtype = _compute_dtype(prev_weight)
    s = s.to(prev_weight.device, dtype)
    weight = (prev_weight.to(dtype) / s.unsqueeze(1)).to(prev_weight.dtype)
    bias = None if prev_bias is None else (prev_bias.to(dtype) / s).to(prev_bias.dtype)
    return weight, bias


def scale_consumer_weights(weights: list[Tensor], s: Tensor) -> list[Tensor]:
    """Multiply each consumer weight [N_i, K] by s along its input columns."""
    scaled = []
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != s.shape[0]:
            raise ValueError(f"consumer weight {i} of shape {tuple(w.shape)} must have K={s.shape[0]} columns")
        dtype = _compute_dtype(w)
        scaled.append((w.to(dtype) * s.to(w.device, dtype)).to(w.dtype))
    return scaled
