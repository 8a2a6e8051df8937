"""Quantizing one decoder layer: the RTN, GPTQ and AWQ passes (the algorithms are in qlora_kit/quant/),
and the GGUF export's pass, which only gathers llama.cpp's importance statistics.

Every pass has one signature, :class:`LayerPass`: it gets the layer's merged fp32 tensors
(names relative to the layer), the layer module (holding them in the compute dtype when
calibration runs), the calibration activations entering the layer, the quantizer and the
family's :class:`~qlora_kit.model.plans.LayerPlan`; it returns the layer's tensors with its
linears as :class:`IntQuantWeight`, exactly as the checkpoint will store them. No pass moves
the activations on to the next layer: the driver does, through whatever the pass left in the
layer module (GPTQ: the quantized weights; AWQ: the full-precision ones).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from qlora_kit.model.plans import AWQGroup, LayerPlan
from qlora_kit.pipelines.activations import Activations, call_input
from qlora_kit.quant.awq import (
    apply_clip,
    fold_scale_into_linear,
    fold_scale_into_norm,
    scale_consumer_weights,
    search_clip,
    search_scale,
)
from qlora_kit.quant.gptq import GPTQ
from qlora_kit.quant.intq import IntQuantWeight, rtn_quantize

log = logging.getLogger("qlora_kit")

AWQ_SEARCH_TOKENS = 65536  # AWQ's scale and clip searches see this many (AutoAWQ's 128 x 512)


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer on the shared int grid: rtn, gptq or awq (awq is always asymmetric)."""

    method: str
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    act_order: bool = False
    damp_percent: float = 0.1

    @property
    def label(self) -> str:
        return f"{self.method.upper()} ({'sym' if self.symmetric else 'asym'})"

    @property
    def checkpoint(self) -> str:
        """The checkpoint layout it is exported in: AWQ gemm for awq, GPTQ v1 for gptq and rtn."""
        return "awq" if self.method == "awq" else "gptq"

    @property
    def calibrated(self) -> bool:
        """Whether it needs calibration activations (GPTQ and AWQ)."""
        return self.method in ("gptq", "awq")


@dataclass
class ImportanceWeighted:
    """A merged full-precision weight and the importance of each of its input columns.

    ``importance[k]`` is the mean of x_k² over the calibration tokens entering the linear:
    llama.cpp's imatrix, which its quantizers use to weight each column's rounding error.
    """

    weight: Tensor
    importance: Tensor


LayerTensors = dict[str, Tensor | IntQuantWeight | ImportanceWeighted]


class LayerPass(Protocol):
    def __call__(
        self,
        layer: nn.Module,
        weights: dict[str, Tensor],
        acts: Activations | None,
        spec: QuantSpec,
        plan: LayerPlan,
        prefix: str,
    ) -> LayerTensors:
        """The layer's tensors, its linears quantized; ``prefix`` (``model.layers.<i>.``) names them in logs."""


def as_stored(w: IntQuantWeight, spec: QuantSpec, name: str) -> IntQuantWeight:
    """The weight exactly as its checkpoint holds it, so later layers, evaluation and files agree.

    Scales are rounded to fp16. GPTQ v1 stores zero - 1 and so cannot hold a zero point
    of 0 (an asymmetric group whose values are all >= -scale/2): such a group moves to
    zero 1 with every code raised by one, which is exact except that code 15 stays 15
    (its weight drops by one step); a warning counts them.
    """
    w = replace(w, scale=w.scale.half().float())
    if spec.checkpoint != "gptq" or w.symmetric:
        return w
    bad = w.zero == 0
    if not bad.any():
        return w
    raise_code = bad[:, w.g_idx.long()]
    clamped = int((raise_code & (w.q == 2**w.bits - 1)).sum())
    log.warning(
        "%s: %d groups have zero point 0, which GPTQ v1 cannot store; stored with zero 1 (%d codes clamped one step)",
        name,
        int(bad.sum()),
        clamped,
    )
    q = torch.where(raise_code, (w.q + 1).clamp(max=2**w.bits - 1), w.q)
    return replace(w, q=q, zero=torch.where(bad, torch.ones_like(w.zero), w.zero))


def _split_rows(w: IntQuantWeight, sizes: list[int]) -> list[IntQuantWeight]:
    """Undo the row-stacking of several linears quantized together."""
    return [
        replace(w, q=q, scale=s, zero=z, g_idx=w.g_idx.clone())
        for q, s, z in zip(w.q.split(sizes), w.scale.split(sizes), w.zero.split(sizes))
    ]


def rtn_layer(
    layer: nn.Module,
    weights: dict[str, Tensor],
    acts: Activations | None,
    spec: QuantSpec,
    plan: LayerPlan,
    prefix: str,
) -> LayerTensors:
    """Round-to-nearest on every linear of the layer (no calibration: ``layer`` and ``acts`` unused)."""
    return weights | {
        f"{n}.weight": as_stored(
            rtn_quantize(weights[f"{n}.weight"], spec.bits, spec.group_size, spec.symmetric), spec, f"{prefix}{n}"
        )
        for n in plan.linears
    }


def gptq_layer(
    layer: nn.Module,
    weights: dict[str, Tensor],
    acts: Activations,
    spec: QuantSpec,
    plan: LayerPlan,
    prefix: str,
) -> LayerTensors:
    """True-sequential GPTQ of one decoder layer; the layer module is left holding the quantized weights.

    Each group's Hessian comes from inputs that already pass through the quantized earlier
    groups of the layer. The linears of a group read the same input, so they share one
    Hessian and are quantized as one row-stacked weight: GPTQ treats rows independently,
    so this equals quantizing each alone, with one pass over the columns instead of three.
    """
    quantized = {}
    for group in plan.gptq_sequence:
        first = layer.get_submodule(group[0])
        gptq = GPTQ(first.in_features, device=acts.device)
        for x in acts.inputs_of(layer, first):
            gptq.add_batch(x)
        stacked = torch.cat([weights[f"{n}.weight"] for n in group])
        q = gptq.quantize(stacked, spec.bits, spec.group_size, spec.symmetric, spec.act_order, spec.damp_percent)
        log.debug("%s%s: GPTQ loss %.4g", prefix, "+".join(group), gptq.loss)
        del gptq
        for n, w in zip(group, _split_rows(q, [weights[f"{n}.weight"].shape[0] for n in group])):
            w = as_stored(w, spec, f"{prefix}{n}")
            quantized[f"{n}.weight"] = w
            module = layer.get_submodule(n)
            module.weight.data = w.dequantize(module.weight.dtype)
    return weights | quantized


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


@contextmanager
def _weights_in(layer: nn.Module, names: Sequence[str], weights: Sequence[Tensor]):
    """Temporarily run ``layer`` with other weights in the named linears."""
    modules = [layer.get_submodule(n) for n in names]
    saved = [m.weight.data for m in modules]
    for m, w in zip(modules, weights):
        m.weight.data = w.to(m.weight.dtype)
    try:
        yield
    finally:
        for m, w in zip(modules, saved):
            m.weight.data = w


def awq_layer(
    layer: nn.Module,
    weights: dict[str, Tensor],
    acts: Activations,
    spec: QuantSpec,
    plan: LayerPlan,
    prefix: str,
) -> LayerTensors:
    """AWQ of one decoder layer: scale search per group, fold, clipping search, quantize.

    Returns the layer's tensors with the folded norms (and previous linears) and the
    quantized linears. As llm-awq and AutoAWQ do, every search sees the full-precision
    layer's inputs, and the layer module is left holding its full-precision weights, so
    the next layer's inputs are the full-precision layer's outputs.
    """
    calls = acts.record(layer, [g.inspect for g in plan.awq_groups], AWQ_SEARCH_TOKENS)
    weights = dict(weights)
    inputs, scales = {}, {}
    for g in plan.awq_groups:
        inputs[g] = torch.cat([_rows(call_input(a, k)) for a, k in calls[g.inspect]])
        consumers = [weights[f"{n}.weight"] for n in g.linears]
        prev = weights[f"{g.prev}.weight"]
        if prev.shape[0] != consumers[0].shape[1]:
            continue  # v -> o under grouped-query attention: v's output is narrower than o's input
        block = layer.get_submodule(g.inspect)

        def block_forward(ws: list[Tensor], g: AWQGroup = g, block: nn.Module = block) -> Tensor:
            with _weights_in(layer, g.linears, ws):
                outs = [_first(block(*a, **k)) for a, k in calls[g.inspect]]
            return torch.cat([_rows(o) for o in outs])

        scales[g] = search_scale(inputs[g], consumers, block_forward, spec.bits, spec.group_size)
    calls.clear()  # the recorded inputs are no longer needed
    # Fold after all searches: each searched against the original weights, as AutoAWQ does.
    for g, s in scales.items():
        if isinstance(layer.get_submodule(g.prev), nn.Linear):
            weights[f"{g.prev}.weight"], bias = fold_scale_into_linear(
                weights[f"{g.prev}.weight"], weights.get(f"{g.prev}.bias"), s
            )
            if bias is not None:
                weights[f"{g.prev}.bias"] = bias
        else:
            weights[f"{g.prev}.weight"] = fold_scale_into_norm(weights[f"{g.prev}.weight"], s)
        for n, w in zip(g.linears, scale_consumer_weights([weights[f"{n}.weight"] for n in g.linears], s)):
            weights[f"{n}.weight"] = w
    for g in plan.awq_groups:
        x = inputs.pop(g)
        if g in scales:
            x = x / scales[g].to(x.dtype)  # the linears now read x / s
        for n in g.linears:
            key = f"{n}.weight"
            if n not in plan.awq_no_clip:
                weights[key] = apply_clip(weights[key], search_clip(x, weights[key], spec.bits, spec.group_size))
            weights[key] = as_stored(
                rtn_quantize(weights[key], spec.bits, spec.group_size, symmetric=False), spec, f"{prefix}{n}"
            )
    return weights


def importance_layer(
    layer: nn.Module,
    weights: dict[str, Tensor],
    acts: Activations | None,
    spec: Any,
    plan: LayerPlan,
    prefix: str,
) -> LayerTensors:
    """The layer's merged tensors for a GGUF file; with calibration, its linears as :class:`ImportanceWeighted`.

    The statistics are llama.cpp's imatrix: every linear's input, through the full-precision
    layer (the module holds the merged weights), accumulated in float64 over all calibration
    tokens. The rounding itself happens in the GGUF writer.
    """
    if acts is None:
        return weights
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(plan.linears, 0)

    def accumulate(module: nn.Module, args: tuple, name: str) -> None:
        x = _rows(args[0]).double()
        sums[name] = sums.get(name, 0) + (x * x).sum(0)
        counts[name] += x.shape[0]

    handles = [
        layer.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: accumulate(m, args, n))
        for n in plan.linears
    ]
    try:
        acts.run(layer)
    finally:
        for handle in handles:
            handle.remove()
    return weights | {
        f"{n}.weight": ImportanceWeighted(weights[f"{n}.weight"], (sums[n] / counts[n]).float()) for n in plan.linears
    }


# The pass of each method; the driver looks it up here at every layer.
LAYER_PASSES: dict[str, LayerPass] = {"rtn": rtn_layer, "gptq": gptq_layer, "awq": awq_layer, "gguf": importance_layer}
