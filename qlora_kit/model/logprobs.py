"""Log-probabilities of the labelled next tokens: what the SFT loss and the preference losses are made of.

``log p(labels[t] | input_ids[:t])`` for every position whose label is set (not -100). The
fast path runs the decoder once and the vocabulary projection only on the labelled
positions (for chat data, the responses), chunk by chunk, each chunk recomputed in backward:
the ``[tokens, vocab]`` fp32 logits never exist beyond one chunk. The plain path takes the
model's full ``[batch, seq, vocab]`` logits (the reference for the chunked one). The SFT loss,
a plain sum, takes :func:`labelled_hidden` to :mod:`qlora_kit.modules.linear_cross_entropy`
instead, which needs no recompute.

With ``stats``, each labelled position also gets, without gradient, the next-token
distribution's entropy, its mean logit and whether the label is its most likely token: the
per-token fields of TRL's fused LM head output that its DPO trainer logs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_kit.model.adapters import lora_modules
from qlora_kit.model.fused import causal_only

IGNORE_INDEX = -100  # labels of tokens outside the loss (torch's cross_entropy default, as in qlora_kit.data)
STATS = ("entropy", "mean_logits", "is_top1")


@dataclass
class LabelledLogProbs:
    """``logps``: one value per labelled position, in row-major order; ``mask``: ``[batch, seq - 1]``,
    True where position t's next token (``labels[:, t + 1]``) is labelled; ``stats``: name -> values
    like ``logps`` (empty without ``stats``)."""

    logps: torch.Tensor
    mask: torch.Tensor
    stats: dict[str, torch.Tensor]

    def per_position(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """``values`` (default: the log-probs) scattered to ``[batch, seq - 1]``, zero where unlabelled."""
        values = self.logps if values is None else values
        return values.new_zeros(self.mask.shape).masked_scatter(self.mask, values)


def find_labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices ``b * seq + t`` of the positions whose next token ``labels[b, t + 1]`` is labelled, in
    row-major order. The data collator finds them on the CPU (see :func:`labelled_hidden`)."""
    return _positions(labels[:, 1:] != IGNORE_INDEX)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """The flat ``[batch, seq]`` indices of the True entries of a ``[batch, seq - 1]`` next-token mask."""
    batch, seq = mask.shape[0], mask.shape[1] + 1
    return torch.arange(batch * seq, device=mask.device).view(batch, seq)[:, :-1][mask]


def labelled_hidden(
    lm: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    labelled_positions: torch.Tensor | None = None,
    **model_inputs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder once; its final hidden states at the labelled positions ``[labelled, hidden]``, their next
    tokens ``[labelled]``, and the mask ``[batch, seq - 1]`` they were taken by (row-major order).

    ``labelled_positions``: :func:`find_labelled_positions` of ``labels``, as the data collator gives them.
    Without them they are found here, on the labels' device: on a GPU that makes the host wait until
    everything queued has run, so the next step's kernels cannot be queued while this one's still run.
    A batch without attention mask and position ids makes no causal mask either (:func:`causal_only`).
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    rows = _positions(mask) if labelled_positions is None else labelled_positions
    unmasked = model_inputs.get("attention_mask") is None and model_inputs.get("position_ids") is None
    with causal_only(unmasked):
        hidden = lm.model(input_ids=input_ids, use_cache=False, **model_inputs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    return hidden, labels.reshape(-1).index_select(0, rows + 1), mask


def labelled_logprobs(
    lm: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 1024,
    stats: bool = False,
    labelled_positions: torch.Tensor | None = None,
    **model_inputs,
) -> LabelledLogProbs:
    """The fast path: the decoder once, then the lm_head on the labelled positions only, in checkpointed chunks."""
    hidden, targets, mask = labelled_hidden(lm, input_ids, labels, labelled_positions, **model_inputs)
    pieces = [
        checkpoint(
            _chunk_logprobs,
            lm.lm_head,
            hidden[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
            stats,
            use_reentrant=False,
        )
        for start in range(0, targets.numel(), chunk_tokens)
    ]
    if not pieces:  # nothing labelled: a zero that still reaches the graph, so backward runs
        pieces = [_chunk_logprobs(lm.lm_head, hidden[:0], targets[:0], stats)]
    logps = torch.cat([p[0] for p in pieces])
    values = {name: torch.cat([p[1][name] for p in pieces]) for name in (STATS if stats else ())}
    return LabelledLogProbs(logps, mask, values)


def plain_labelled_logprobs(
    lm: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, stats: bool = False, **model_inputs
) -> LabelledLogProbs:
    """The same through the model's full logits."""
    logits = lm(input_ids=input_ids, use_cache=False, **model_inputs).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps, values = _logprobs(logits[mask], targets[mask], stats)
    return LabelledLogProbs(logps, mask, values)


def _chunk_logprobs(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, stats: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return _logprobs(lm_head(hidden).float(), targets, stats)


def _logprobs(logits: torch.Tensor, targets: torch.Tensor, stats: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logps = -nn.functional.cross_entropy(logits, targets, reduction="none")
    values = {}
    if stats:
        with torch.no_grad():
            log_z = logits.logsumexp(-1)
            values["entropy"] = log_z - (torch.softmax(logits, -1) * logits).sum(-1)
            values["mean_logits"] = logits.mean(-1)
            values["is_top1"] = logits.argmax(-1) == targets
    return logps, values


@contextmanager
def adapters_disabled(lm: nn.Module) -> Iterator[None]:
    """Within the block every LoRA layer computes its base alone: its scale is 0.

    A scale of 0 (rather than a different forward) switches the adapters off in every LoRA
    class alike, fused, offloaded or under QAT, where the base is then the fake-quantized
    base weight, the model the adapters start from.
    """
    layers = list(lora_modules(lm).values())
    scales = [m.scaling for m in layers]
    for m in layers:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, scale in zip(layers, scales):
            m.scaling = scale
