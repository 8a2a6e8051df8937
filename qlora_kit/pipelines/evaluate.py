"""Evaluation used at every stage: perplexity on held-out text, response loss, logit agreement, exact-match accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable

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
def response_loss(model: nn.Module, batches: Iterable[dict]) -> float:
    """Mean next-token cross-entropy over the labelled tokens (label != -100) of padded batches.

    ``batches``: what the data module's ``DataCollator`` makes of a tokenized validation
    split (``input_ids``, ``labels`` and the attention mask): the loss training reports as
    validation loss.
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits[:, :-1].float()
        targets = batch["labels"][:, 1:].to(device)
        total_nll += nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum").item()
        total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        raise ValueError("response_loss: no labelled tokens in the batches")
    return total_nll / total_tokens


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


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = False,
) -> list[str]:
    """Greedy completions of chat prompts (the template's generation prompt appended)."""
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
            texts = [
                tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                for p in prompts[start : start + batch_size]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def exact_match_accuracy(
    model: nn.Module, tokenizer, examples: list[dict], max_new_tokens: int = 64, progress: bool = False
) -> tuple[float, list[str]]:
    """Fraction of test examples whose greedy answer equals the reference (see ``data.exact_match``)."""
    from qlora_kit.data import exact_match

    if not examples:
        raise ValueError("exact-match accuracy needs at least one test example")
    answers = generate_answers(model, tokenizer, [e["messages"] for e in examples], max_new_tokens, progress=progress)
    correct = sum(exact_match(a, e["answer"]) for a, e in zip(answers, examples))
    return correct / len(examples), answers
