"""The model side of DPO and ORPO: per-token log-probabilities of the answers, policy and reference.

:class:`PreferenceModel` wraps the causal LM as :class:`~qlora_kit.model.sft.SFTModel` does, and
answers the call TRL's preference trainers make of a model with its fused LM head,
``model(input_ids=..., attention_mask=..., labels=..., fused_lm_head=True)``, with TRL's
:class:`~trl.trainer.utils.FusedCausalLMOutput`: the log-probability of every labelled next
token (zero elsewhere), from the chunked labelled-positions-only path of
:mod:`qlora_kit.model.logprobs`. So TRL's own loss code runs on it unchanged.

The reference is the same model with its adapters switched off (:attr:`PreferenceModel.reference`):
one NF4 base in memory, no second copy.
"""

from __future__ import annotations

from torch import nn
from trl.trainer.utils import FusedCausalLMOutput

from qlora_kit.model.logprobs import STATS, adapters_disabled, labelled_logprobs, plain_labelled_logprobs


class PreferenceModel(nn.Module):
    """``forward(input_ids, attention_mask, labels, fused_lm_head=True)`` -> TRL's fused LM head output.

    ``chunked``: the fast path's chunked lm_head (else the full logits). ``stats=False`` skips the
    logged per-token statistics (the reference needs only log-probabilities).
    """

    accepts_loss_kwargs = False  # each micro-batch's loss is a mean: the Trainer divides by the accumulation steps
    # TRL switches gradient checkpointing off around its reference forward; here that forward runs without
    # gradients, where checkpointing recomputes nothing, so there is nothing to switch.
    is_gradient_checkpointing = False

    def __init__(self, lm: nn.Module, chunked: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.chunked = chunked

    @property
    def config(self):
        return self.lm.config

    @property
    def reference(self) -> AdaptersOff:
        """This model with the adapters off, called as the model is (TRL's ``ref_model``)."""
        return AdaptersOff(self)

    def generate(self, *args, **kwargs):
        """``lm.generate``: under FSDP, where this is the root module, it gathers the root's weights around it."""
        return self.lm.generate(*args, **kwargs)

    def forward(
        self,
        input_ids,
        labels,
        attention_mask=None,
        fused_lm_head: bool = True,
        use_cache=None,
        stats: bool = True,
        **kwargs,
    ) -> FusedCausalLMOutput:
        if not fused_lm_head:
            raise ValueError("PreferenceModel computes log-probabilities only: call it with fused_lm_head=True")
        compute = labelled_logprobs if self.chunked else plain_labelled_logprobs
        scored = compute(self.lm, input_ids, labels, stats=stats, attention_mask=attention_mask)
        per_token = {name: scored.per_position(scored.stats[name]) for name in STATS if name in scored.stats}
        return FusedCausalLMOutput(
            loss=-scored.logps.sum() / scored.mask.sum().clamp(min=1),
            log_probs=scored.per_position(),
            label_mask=scored.mask,
            **per_token,
        )


class AdaptersOff:
    """Calls a :class:`PreferenceModel` with its adapters switched off and without statistics.

    Not a module: it holds no weights of its own, so nothing wraps, registers or saves it twice.
    It calls the model itself, never a DDP wrapper around it: the reference gets no gradients to
    synchronise. Under FSDP the model is the sharded root, whose call gathers the weights.
    """

    def __init__(self, model: PreferenceModel) -> None:
        self.model = model

    def __call__(self, **inputs) -> FusedCausalLMOutput:
        with adapters_disabled(self.model.lm):
            return self.model(**inputs, stats=False)
