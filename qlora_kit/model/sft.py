"""The supervised fine-tuning objective: next-token cross-entropy on the labelled tokens only."""

from __future__ import annotations

import torch
from torch import nn

from qlora_kit.model.logprobs import labelled_hidden, labelled_logprobs, plain_labelled_logprobs
from qlora_kit.modules import linear_cross_entropy


def causal_lm_loss(
    lm: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    labelled_positions: torch.Tensor | None = None,
    **model_inputs,
) -> torch.Tensor:
    """Sum of next-token NLL over positions whose label is set, divided by the label count.

    The lm_head runs on the labelled positions only, chunk by chunk: the ``[tokens, vocab]`` fp32
    logits never exist beyond one chunk. A frozen lm_head (LoRA's case) goes through
    :func:`~qlora_kit.modules.linear_cross_entropy.linear_nll_sum`, which makes the gradient in the
    forward pass; any other through :func:`~qlora_kit.model.logprobs.labelled_logprobs`.
    ``num_items_in_batch`` is the label count of the whole accumulated batch when the Trainer provides it;
    ``labelled_positions`` the data collator's :func:`~qlora_kit.model.logprobs.find_labelled_positions`.
    """
    if linear_cross_entropy.supports(lm.lm_head):
        hidden, targets, mask = labelled_hidden(lm, input_ids, labels, labelled_positions, **model_inputs)
        nll = linear_cross_entropy.linear_nll_sum(hidden, lm.lm_head, targets, chunk_tokens)
    else:  # a trained or wrapped lm_head: its own gradient, through autograd
        scored = labelled_logprobs(
            lm, input_ids, labels, chunk_tokens, labelled_positions=labelled_positions, **model_inputs
        )
        nll, mask = -scored.logps.sum(), scored.mask
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    return nll / count


def plain_causal_lm_loss(
    lm: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch=None,
    labelled_positions: torch.Tensor | None = None,
    **model_inputs,
) -> torch.Tensor:
    """The same loss through the model's full ``[batch, seq, vocab]`` logits (the reference for the chunked one);
    ``labelled_positions`` is not needed there."""
    scored = plain_labelled_logprobs(lm, input_ids, labels, **model_inputs)
    count = num_items_in_batch if num_items_in_batch is not None else scored.mask.sum().clamp(min=1)
    return -scored.logps.sum() / count


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

    def forward(
        self,
        input_ids,
        labels,
        attention_mask=None,
        position_ids=None,
        use_cache=None,
        labelled_positions=None,
        **kwargs,
    ) -> dict:
        loss = self.loss(
            self.lm,
            input_ids,
            labels,
            kwargs.get("num_items_in_batch"),
            labelled_positions=labelled_positions,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        return {"loss": loss}
