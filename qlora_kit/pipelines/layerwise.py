"""The merge driver: the merged (and re-quantized) model, one decoder layer at a time.

    base weights of layer i, fp32 on the device (base_weights.py: dequantized NF4, or the original tensors)
      + scale * B @ A on every adapted linear                          merge
      -> RTN, GPTQ or AWQ on layer i's calibration activations          quantize (quantize.py)
      -> yielded to the caller: the checkpoint writer and the report    export (export.py), evaluate
    then the activations pass through layer i to become layer i+1's inputs.

Only one decoder layer exists in full precision at any time. Which linears a layer has, and
the order and groups the quantizers work in, come from the family's layer plan (model/plans.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlora_kit.model.adapters import Adapter
from qlora_kit.model.plans import layer_plan
from qlora_kit.pipelines.activations import Activations
from qlora_kit.pipelines.base_weights import BaseWeights
from qlora_kit.pipelines.quantize import LAYER_PASSES, LayerTensors, QuantSpec


def skeleton_model(config, dtype: torch.dtype) -> nn.Module:
    """The stock transformers model on the meta device (rotary buffers real): names, shapes and layer code."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()  # a tied lm_head is then one parameter with the embeddings, not a tensor of its own
    return model


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Decoder linear path -> (out N, in K)."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("model.layers.")
    }


@torch.no_grad()
def merged_model(
    config,
    base: BaseWeights,
    adapter: Adapter | None,
    spec: QuantSpec | None,
    calibration: Tensor | None,
    device: torch.device,
    compute_dtype: torch.dtype,
    progress: bool = True,
) -> Iterator[LayerTensors]:
    """The merged (and, with ``spec``, quantized) model as dicts of full-name tensors, in order.

    First the input embeddings, then one dict per decoder layer, then the rest (final
    norm, an untied lm_head). Float tensors are fp32 on ``device``; quantized linears are
    :class:`IntQuantWeight` exactly as their checkpoint will store them. GPTQ and AWQ need
    ``calibration`` token ids [samples, seq_len].
    """
    plan = layer_plan(config.model_type)
    model = skeleton_model(config, compute_dtype)
    plan.check(model.model.layers[0], config.model_type)
    embed = model.get_input_embeddings()
    embed_name = next(n for n, p in model.named_parameters() if p is embed.weight)
    rest = [n for n, _ in model.named_parameters() if not n.startswith("model.layers.") and n != embed_name]
    first = base.get([embed_name])
    yield first
    acts = None
    if spec is not None and spec.calibrated:
        if calibration is None:
            raise ValueError(f"{spec.method} needs calibration token ids")
        embed.weight = nn.Parameter(first[embed_name].to(compute_dtype), requires_grad=False)
        model.model.rotary_emb.to(device)
        acts = Activations.capture(model, calibration, device)
        embed.to_empty(device="meta")
    del first
    layer_params = [n for n, _ in model.model.layers[0].named_parameters()]
    label = "merging" if spec is None else f"{spec.label} merge + quantize"
    for i in tqdm(range(config.num_hidden_layers), desc=label, unit="layer", disable=not progress):
        prefix = f"model.layers.{i}."
        weights = {n.removeprefix(prefix): t for n, t in base.get([prefix + n for n in layer_params]).items()}
        for n in plan.linears:
            delta = adapter.delta(prefix + n, device) if adapter is not None else None
            if delta is not None:
                weights[f"{n}.weight"] += delta
        layer = model.model.layers[i]
        if acts is not None:
            layer.to_empty(device=device)
            for n, p in layer.named_parameters():
                p.copy_(weights[n])
        out = weights if spec is None else LAYER_PASSES[spec.method](layer, weights, acts, spec, plan, prefix)
        if acts is not None:
            # The next layer's inputs: through the quantized layer after GPTQ (its Hessians then see
            # the quantized earlier layers), through the full-precision layer after AWQ (as llm-awq
            # and AutoAWQ search); each pass leaves the layer module holding those weights.
            acts.advance(layer)
        layer.to_empty(device="meta")
        yield {prefix + n: t for n, t in out.items()}
    yield base.get(rest)
