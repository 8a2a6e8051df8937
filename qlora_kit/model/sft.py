"""The supervised fine-tuning objective: next-token cross-entropy on the labelled tokens only."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # labels of tokens outside the loss (torch's cross_entropy default, as in qlora_kit.data)


def causal_lm_loss(
    lm: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    **model_inputs,
) -> torch.Tensor:
    """Sum of next-token NLL over positions whose label is set, divided by the label count.

    The decoder runs once; the vocabulary projection runs only on the labelled
    positions (for chat data, the responses), chunk by chunk, each chunk recomputed in
    backward: the ``[tokens, vocab]`` fp32 logits never exist beyond one chunk.
    ``num_items_in_batch`` is the label count of the whole accumulated batch when the
    Trainer provides it.
    """
    hidden = lm.model(input_ids=input_ids, use_cache=False, **model_inputs).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + checkpoint(_nll_sum, lm.lm_head, hidden[chunk], targets[chunk], use_reentrant=False)
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    return total / count


def plain_causal_lm_loss(
    lm: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, **model_inputs
) -> torch.Tensor:
    """The same loss through the model's full ``[batch, seq, vocab]`` logits (the reference for the chunked one)."""
    logits = lm(input_ids=input_ids, use_cache=False, **model_inputs).logits[:, :-1].float()
    targets = labels[:, 1:]
    total = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def _nll_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


class SFTModel(nn.Module):
    """Wraps a causal LM so that ``forward(**batch)`` returns the SFT loss (what the Trainer calls).

    Wrapping (rather than overriding the Trainer's loss) keeps the whole forward inside
    the module that DDP/FSDP wrap, so gradient synchronisation sees it.
    """

    accepts_loss_kwargs = True  # the Trainer then passes num_items_in_batch

    def __init__(self, lm: nn.Module, chunked_loss: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.loss = causal_lm_loss if chunked_loss else plain_causal_lm_loss

    @property
    def config(self):
        return self.lm.config

    def generate(self, *args, **kwargs):
        """``lm.generate``: under FSDP, where this is the root module, it gathers the root's weights around it."""
        return self.lm.generate(*args, **kwargs)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, use_cache=None, **kwargs) -> dict:
        loss = self.loss(
            self.lm,
            input_ids,
            labels,
            kwargs.get("num_items_in_batch"),
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        return {"loss": loss}
