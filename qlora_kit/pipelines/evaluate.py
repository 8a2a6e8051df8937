"""Evaluation used at every stage: perplexity on held-out text, logit agreement, exact-match accuracy."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int = 512, progress: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len`` tokens.

    Every token after the first of each window is predicted once; a short last
    window is kept so no text is dropped.
    """
    device = next(model.parameters()).device
    ids = token_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    total_nll, total_tokens = 0.0, 0
    starts = range(0, ids.numel() - 1, seq_len)
    for start in tqdm(starts, desc="perplexity", disable=not progress):
        window = ids[start : start + seq_len].to(device)
        if window.numel() < 2:
            break
        logits = model(window[None]).logits[0, :-1].float()
        total_nll += nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        total_tokens += window.numel() - 1
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def logit_agreement(model_a: nn.Module, model_b: nn.Module, token_ids: torch.Tensor, seq_len: int = 512) -> dict:
    """How closely model_a's next-token distributions follow model_b's on the same text.

    Returns the relative L2 error of the logits, the top-1 agreement and the mean
    KL(b || a) in nats per token.
    """
    ids = token_ids.reshape(-1)[:seq_len][None]
    a = model_a(ids.to(next(model_a.parameters()).device)).logits[0].float().cpu()
    b = model_b(ids.to(next(model_b.parameters()).device)).logits[0].float().cpu()
    kl = nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="batchmean")
    return {
        "relative_l2": ((a - b).norm() / b.norm()).item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "kl_nats_per_token": kl.item(),
    }
