"""Merge LoRA adapters into their base, re-quantize (RTN / GPTQ / AWQ), export and evaluate.

The driver walks the decoder layers one at a time (design.md: merge -> quantize -> export):

    base weights of layer i, fp32 on the device (dequantized NF4, or the original tensors)
      + scale * B @ A on every adapted linear                          merge
      -> RTN, GPTQ or AWQ on layer i's calibration activations          quantize (quant/)
      -> the checkpoint writer, which writes a shard every few layers   export (export.py)
    then the activations pass through layer i to become layer i+1's inputs.

Only one decoder layer exists in full precision at any time. The calibration
activations ([samples, seq_len, hidden] in the compute dtype) are carried from layer to
layer on the device, or on the CPU when they would take more than a quarter of the free
device memory, and then move to the device one chunk of samples at a time.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlora_kit.errors import UserInputError
from qlora_kit.model.adapters import (
    ADAPTER_WEIGHTS,
    AdapterError,
    add_lora,
    load_adapter_weights,
    read_adapter_config,
    read_adapter_weights,
)
from qlora_kit.model.load import check_supported, default_device, load_quantized, resolve_compute_dtype
from qlora_kit.model.sources import (
    ModelSource,
    ModelSourceError,
    iter_tensors,
    load_config,
    load_tokenizer,
    resolve_source,
)
from qlora_kit.modules.lora import lora_scale
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.pipelines.evaluate import exact_match_accuracy, perplexity, response_loss
from qlora_kit.pipelines.export import (
    DEFAULT_SHARD_BYTES,
    CheckpointWriter,
    awq_quantization_config,
    check_output_dir,
    gptq_quantization_config,
    marlin_problems,
)
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
from qlora_kit.quant.nf4 import dequantize_nf4

if TYPE_CHECKING:
    from qlora_kit.config import Recipe

# The data stack (datasets, recipes) is imported where calibration or test data is read:
# the driver itself needs only torch and transformers (scripts/bench_quantize.py feeds it token ids).
log = logging.getLogger("qlora_kit")

DEFAULT_EVAL_TEXT = "examples/heldout/essays.txt"
RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"
METHODS = ("none", "rtn", "gptq", "awq")
CHUNK_TOKENS = 16384  # calibration tokens per layer call
AWQ_SEARCH_TOKENS = 65536  # AWQ's scale and clip searches see this many (AutoAWQ's 128 x 512)

# GPTQ's true-sequential order inside a decoder layer; the linears of one group read the same input.
GPTQ_SEQUENCE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class AWQGroup:
    """Linears that read the output of ``prev`` (a norm or a linear).

    ``inspect`` is the block whose output the scale search compares.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str


AWQ_GROUPS = (
    AWQGroup("input_layernorm", GPTQ_SEQUENCE[0], "self_attn"),
    AWQGroup("self_attn.v_proj", GPTQ_SEQUENCE[1], "self_attn.o_proj"),
    AWQGroup("post_attention_layernorm", GPTQ_SEQUENCE[2], "mlp"),
    AWQGroup("mlp.up_proj", GPTQ_SEQUENCE[3], "mlp.down_proj"),
)
AWQ_NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # q.k^T amplifies clipping errors
LAYER_LINEARS = tuple(name for group in GPTQ_SEQUENCE for name in group)


class MergeError(UserInputError):
    """Merge options or inputs that cannot be used; the message says which and why."""


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


@dataclass
class MergeOptions:
    """Everything ``qlora-kit merge`` takes (see docs/merge.md)."""

    adapter_dir: str
    out: str
    quantize: str = "none"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    damp_percent: float = 0.1
    merge_into: str = "nf4"
    base: str | None = None
    calibration: str | None = None
    calibration_samples: int = 128
    calibration_seq_len: int = 2048
    report: bool = False
    evaluate: bool = True
    eval_text: str = DEFAULT_EVAL_TEXT
    test_examples: int | None = None
    overwrite: bool = False
    device: str | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# The adapter


@dataclass
class Adapter:
    """LoRA weights of an adapter directory: module path -> (A [r, K], B [N, r]), fp32 on the CPU."""

    directory: Path
    scaling: float
    lora: dict[str, tuple[Tensor, Tensor]]
    config: dict
    base: str
    gguf_file: str | None
    recipe: Recipe | None

    def delta(self, path: str, device: torch.device) -> Tensor | None:
        """scale * B @ A in fp32 for the linear at ``path``; None when it has no adapter."""
        if path not in self.lora:
            return None
        a, b = self.lora[path]
        return self.scaling * (b.to(device) @ a.to(device))


_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def read_adapter(directory: str | Path) -> Adapter:
    """Read and check a PEFT LoRA adapter directory (plus the recipe.yaml that training wrote)."""
    from qlora_kit.config import load_recipe

    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {directory} does not exist")
    config = read_adapter_config(directory)
    unsupported = {
        "use_dora": config.get("use_dora"),
        "fan_in_fan_out": config.get("fan_in_fan_out"),
        "rank_pattern": config.get("rank_pattern"),
        "alpha_pattern": config.get("alpha_pattern"),
        "modules_to_save": config.get("modules_to_save"),
    }
    used = [key for key, value in unsupported.items() if value]
    if used:
        raise AdapterError(f"{directory}/adapter_config.json sets {used}, which merging does not support")
    path = directory / ADAPTER_WEIGHTS
    tensors = read_adapter_weights(directory)
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise AdapterError(
                f"{path}: unexpected tensor '{key}' (expected base_model.model.<module>.lora_A/B.weight)"
            )
        parts.setdefault(match[1], {})[match[2]] = t.float()
    lora = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: '{module}' has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{path}: '{module}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}: ranks differ"
            )
        lora[module] = (a, b)
    if not lora:
        raise AdapterError(f"{path} holds no LoRA weights")
    recipe = load_recipe(directory / RECIPE_FILE) if (directory / RECIPE_FILE).is_file() else None
    base = recipe.model.name_or_path if recipe else config.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{directory} names no base model (no recipe.yaml, no base_model_name_or_path): pass --base")
    scaling = lora_scale(config["r"], config["lora_alpha"], config.get("use_rslora", False))
    return Adapter(directory, scaling, lora, config, base, recipe.model.gguf_file if recipe else None, recipe)


def check_adapter_fits(adapter: Adapter, shapes: dict[str, tuple[int, int]], base: str) -> None:
    """Every adapted module must be a decoder linear of the base, with matching shapes."""
    where = adapter.directory / ADAPTER_WEIGHTS
    for path, (a, b) in adapter.lora.items():
        if path not in shapes:
            raise AdapterError(
                f"{where}: the adapter has '{path}', which is not a decoder linear of {base} "
                f"(e.g. {next(iter(shapes))}); was it trained on another base model?"
            )
        n, k = shapes[path]
        if a.shape[1] != k or b.shape[0] != n:
            raise AdapterError(
                f"{where}: '{path}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but {base} has a "
                f"[{n}, {k}] weight there (lora_A must be [r, {k}], lora_B [{n}, r]): the adapter was trained "
                "on another base model"
            )


# ---------------------------------------------------------------------------------------------
# Base weights, one layer at a time


class BaseWeights(Protocol):
    def get(self, names: Sequence[str]) -> dict[str, Tensor]:
        """The named base tensors in fp32 on the device."""


class NF4Weights:
    """Base weights from an NF4 model (what training saw), each linear dequantized when asked for.

    The NF4 model may sit on the CPU: a tensor moves to the device only to be dequantized.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.nf4 = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
        self.params = dict(model.named_parameters())

    def get(self, names: Sequence[str]) -> dict[str, Tensor]:
        out = {}
        for name in names:
            if name in self.nf4:
                out[name] = dequantize_nf4(self.nf4[name].nf4_weight.to(self.device), torch.float32)
            else:
                out[name] = self.params[name].detach().to(self.device, torch.float32, copy=True)
        return out


class CheckpointWeights:
    """Base weights streamed from the original checkpoint (``iter_tensors``), in its own order.

    Tensors that arrive before they are asked for wait in CPU memory: with a GGUF file
    (stored layer by layer) that is nothing; with safetensors shards whose names sort
    alphabetically (layers 1, 10, 11, ..., 19, 2) it can be about ten layers.
    """

    def __init__(self, source: ModelSource, device: torch.device) -> None:
        self.source, self.device = source, device
        self._stream = iter_tensors(source)
        self._pending: dict[str, Tensor] = {}

    def get(self, names: Sequence[str]) -> dict[str, Tensor]:
        if not all(n in self._pending for n in names):
            for name, tensor in self._stream:  # resumes where the previous call stopped
                self._pending[name] = tensor
                if all(n in self._pending for n in names):
                    break
        absent = [n for n in names if n not in self._pending]
        if absent:
            raise ModelSourceError(f"the checkpoint of {self.source.name} has no tensor {absent[0]}")
        return {n: self._pending.pop(n).to(self.device, torch.float32) for n in names}


# ---------------------------------------------------------------------------------------------
# Calibration activations, carried from layer to layer


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward pass."""


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _call_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


class Activations:
    """The calibration hidden states entering the current decoder layer, in chunks of whole samples.

    ``hidden[j]`` lives on ``store`` and moves to ``device`` while a layer runs on it;
    ``kwargs[j]`` is what the model passes every decoder layer besides the hidden states
    (rotary embeddings, mask, positions), captured once at the first layer.
    """

    def __init__(self, hidden: list[Tensor], kwargs: list[dict], device: torch.device, store: torch.device) -> None:
        self.hidden, self.kwargs, self.device, self.store = hidden, kwargs, device, store

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, ids: Tensor, device: torch.device) -> Activations:
        """Run ``model`` (embeddings materialized, decoder layers possibly on meta) up to its first layer."""
        dtype = model.get_input_embeddings().weight.dtype
        per_chunk = max(1, CHUNK_TOKENS // ids.shape[1])
        nbytes = ids.numel() * model.config.hidden_size * dtype.itemsize
        store = device
        if device.type == "cuda" and nbytes > torch.cuda.mem_get_info(device)[0] / 4:
            store = torch.device("cpu")
        log.info("calibration activations: %.2f GiB on %s", nbytes / 2**30, store)
        captured = []

        def catch(module, args, kwargs):
            captured.append((_call_input(args, kwargs), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            raise _StopForward

        handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for chunk in ids.split(per_chunk):
                try:
                    model.model(input_ids=chunk.to(device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return cls([h.to(store) for h, _ in captured], [kw for _, kw in captured], device, store)

    @torch.no_grad()
    def inputs_of(self, layer: nn.Module, module: nn.Module) -> Iterator[Tensor]:
        """The input of ``module`` for each chunk; the layer runs only as far as ``module``."""
        seen = []

        def stop(mod, args):
            seen.append(args[0])
            raise _StopForward

        handle = module.register_forward_pre_hook(stop)
        try:
            for hidden, kwargs in zip(self.hidden, self.kwargs):
                try:
                    layer(hidden.to(self.device), **kwargs)
                except _StopForward:
                    pass
                yield seen.pop()
        finally:
            handle.remove()

    @torch.no_grad()
    def record(self, layer: nn.Module, names: Sequence[str], max_tokens: int) -> dict[str, list[tuple[tuple, dict]]]:
        """The (args, kwargs) of every call of the named submodules, over the first chunks holding ``max_tokens``."""
        calls: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in names}
        handles = [
            layer.get_submodule(name).register_forward_pre_hook(
                lambda m, args, kwargs, name=name: calls[name].append((args, kwargs)), with_kwargs=True
            )
            for name in names
        ]
        tokens = 0
        try:
            for hidden, kwargs in zip(self.hidden, self.kwargs):
                if tokens >= max_tokens:
                    break
                layer(hidden.to(self.device), **kwargs)
                tokens += hidden.shape[0] * hidden.shape[1]
        finally:
            for handle in handles:
                handle.remove()
        return calls

    @torch.no_grad()
    def advance(self, layer: nn.Module) -> None:
        """Replace every chunk by the layer's output: the next layer's inputs."""
        for j, (hidden, kwargs) in enumerate(zip(self.hidden, self.kwargs)):
            self.hidden[j] = layer(hidden.to(self.device), **kwargs).to(self.store)


# ---------------------------------------------------------------------------------------------
# Quantizing one decoder layer


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


def rtn_layer(weights: dict[str, Tensor], spec: QuantSpec, prefix: str) -> dict[str, IntQuantWeight]:
    """Round-to-nearest on every linear of the layer."""
    return {
        f"{n}.weight": as_stored(
            rtn_quantize(weights[f"{n}.weight"], spec.bits, spec.group_size, spec.symmetric), spec, f"{prefix}{n}"
        )
        for n in LAYER_LINEARS
    }


def gptq_layer(
    layer: nn.Module, weights: dict[str, Tensor], acts: Activations, spec: QuantSpec, prefix: str
) -> dict[str, IntQuantWeight]:
    """True-sequential GPTQ of one decoder layer (the layer module is left holding the quantized weights).

    Each group's Hessian comes from inputs that already pass through the quantized earlier
    groups of the layer. The linears of a group read the same input, so they share one
    Hessian and are quantized as one row-stacked weight: GPTQ treats rows independently,
    so this equals quantizing each alone, with one pass over the columns instead of three.
    """
    quantized = {}
    for group in GPTQ_SEQUENCE:
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
    return quantized


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
    layer: nn.Module, weights: dict[str, Tensor], acts: Activations, spec: QuantSpec, prefix: str
) -> dict[str, Tensor | IntQuantWeight]:
    """AWQ of one decoder layer: scale search per group, fold, clipping search, quantize.

    Returns the layer's tensors with the folded norms (and previous linears) and the
    quantized linears. As llm-awq and AutoAWQ do, every search sees the full-precision
    layer's inputs, and the next layer's inputs are the full-precision layer's outputs.
    """
    calls = acts.record(layer, [g.inspect for g in AWQ_GROUPS], AWQ_SEARCH_TOKENS)
    acts.advance(layer)
    weights = dict(weights)
    inputs, scales = {}, {}
    for g in AWQ_GROUPS:
        inputs[g] = torch.cat([_rows(_call_input(a, k)) for a, k in calls[g.inspect]])
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
    for g in AWQ_GROUPS:
        x = inputs.pop(g)
        if g in scales:
            x = x / scales[g].to(x.dtype)  # the linears now read x / s
        for n in g.linears:
            key = f"{n}.weight"
            if n not in AWQ_NO_CLIP:
                weights[key] = apply_clip(weights[key], search_clip(x, weights[key], spec.bits, spec.group_size))
            weights[key] = as_stored(
                rtn_quantize(weights[key], spec.bits, spec.group_size, symmetric=False), spec, f"{prefix}{n}"
            )
    return weights


# ---------------------------------------------------------------------------------------------
# The driver


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


def check_layer_plan(model: nn.Module) -> None:
    """GPTQ/AWQ know the Llama decoder layer's seven linears; refuse a layer with others."""
    found = {name for name, m in model.model.layers[0].named_modules() if isinstance(m, nn.Linear)}
    if found != set(LAYER_LINEARS):
        raise MergeError(f"decoder layers hold linears {sorted(found)}; merge knows {sorted(LAYER_LINEARS)}")


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
) -> Iterator[dict[str, Tensor | IntQuantWeight]]:
    """The merged (and, with ``spec``, quantized) model as dicts of full-name tensors, in order.

    First the input embeddings, then one dict per decoder layer, then the rest (final
    norm, an untied lm_head). Float tensors are fp32 on ``device``; quantized linears are
    :class:`IntQuantWeight` exactly as their checkpoint will store them. GPTQ and AWQ need
    ``calibration`` token ids [samples, seq_len].
    """
    model = skeleton_model(config, compute_dtype)
    check_layer_plan(model)
    embed = model.get_input_embeddings()
    embed_name = next(n for n, p in model.named_parameters() if p is embed.weight)
    rest = [n for n, _ in model.named_parameters() if not n.startswith("model.layers.") and n != embed_name]
    first = base.get([embed_name])
    yield first
    acts = None
    if spec is not None and spec.method in ("gptq", "awq"):
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
        for n in LAYER_LINEARS:
            delta = adapter.delta(prefix + n, device) if adapter is not None else None
            if delta is not None:
                weights[f"{n}.weight"] += delta
        layer = model.model.layers[i]
        if acts is not None:
            layer.to_empty(device=device)
            for n, p in layer.named_parameters():
                p.copy_(weights[n])
        if spec is None:
            out = weights
        elif spec.method == "rtn":
            out = weights | rtn_layer(weights, spec, prefix)
        elif spec.method == "gptq":
            out = weights | gptq_layer(layer, weights, acts, spec, prefix)
            acts.advance(layer)  # the next layer's inputs come through this quantized layer
        else:
            out = awq_layer(layer, weights, acts, spec, prefix)
        layer.to_empty(device="meta")
        yield {prefix + n: t for n, t in out.items()}
    yield base.get(rest)


# ---------------------------------------------------------------------------------------------
# Evaluation


class _Collector:
    """The tensors of a checkpoint as a stock transformers model would load them, kept in memory.

    Float tensors are rounded to the checkpoint's dtype; quantized linears become
    scale * (q - zero) (exactly what packing.unpack_* gives back from the files).
    """

    def __init__(self, checkpoint_dtype: torch.dtype, eval_dtype: torch.dtype) -> None:
        self.checkpoint_dtype, self.eval_dtype = checkpoint_dtype, eval_dtype
        self.state: dict[str, Tensor] = {}

    def add(self, tensors: dict[str, Tensor | IntQuantWeight]) -> None:
        for name, value in tensors.items():
            if isinstance(value, IntQuantWeight):
                t = value.dequantize(torch.float32)
            else:
                t = value.to(self.checkpoint_dtype)
            self.state[name] = t.to("cpu", self.eval_dtype)


def stock_model(config, state: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A stock transformers model holding ``state`` (lm_head tied when the config says so)."""
    model = skeleton_model(config, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n in missing if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(device).eval()


def load_test_examples(recipe: Recipe | None, limit: int | None) -> list[dict]:
    """The recipe's test split as {"messages": prompt, "answer": reference} (data.test; [] when none)."""
    from qlora_kit.data import test_examples

    if recipe is None or not recipe.data.test:
        return []
    examples, _ = test_examples(recipe.data.test, recipe.data)
    limit = limit or recipe.eval.max_test_examples
    return examples[:limit] if limit else examples


def load_validation(recipe: Recipe | None, tokenizer, batch_size: int = 8) -> list[dict] | None:
    """The recipe's validation split, tokenized as training tokenized it and padded into
    batches by its collator (None when there is none)."""
    from qlora_kit.data import DataCollator, build_datasets

    if recipe is None or not (recipe.data.validation or recipe.data.validation_split):
        return None
    # Unpacked: the loss is taken per example, with its own attention mask.
    validation = build_datasets(replace(recipe.data, packing=False), tokenizer, recipe.training.seed).validation
    if validation is None:
        return None
    collate = DataCollator(tokenizer)
    return [
        collate([validation[i] for i in range(start, min(start + batch_size, len(validation)))])
        for start in range(0, len(validation), batch_size)
    ]


@dataclass
class Evaluation:
    """What every model of the report is measured on: held-out perplexity, the loss on the recipe's
    validation split (as training reports it), and exact match on the test split."""

    tokenizer: Any
    eval_ids: Tensor
    examples: list[dict]
    max_new_tokens: int
    validation: list[dict] | None = None  # padded batches of the recipe's validation split

    def __call__(self, model: nn.Module) -> dict:
        result = {"perplexity": perplexity(model, self.eval_ids)}
        if self.validation:
            result["val_loss"] = response_loss(model, self.validation)
        if self.examples:
            result["exact_match"], _ = exact_match_accuracy(model, self.tokenizer, self.examples, self.max_new_tokens)
        return result


def format_report(report: dict) -> str:
    """The table printed at the end of a merge."""
    rows = report["results"]
    known = (
        ("perplexity", "perplexity", "{:.3f}"),
        ("val_loss", "val loss", "{:.4f}"),
        ("exact_match", "exact match", "{:.1%}"),
        ("seconds", "seconds", "{}"),
    )
    columns = [c for c in known if any(c[0] in r for r in rows)]
    lines = ["\n" + f"{'model':24}" + "".join(f"{title:>14}" for _, title, _ in columns)]
    for r in rows:
        cells = [fmt.format(r[key]) if key in r else "-" for key, _, fmt in columns]
        lines.append(f"{r['model']:24}" + "".join(f"{cell:>14}" for cell in cells))
    if report["eval_text"]:
        lines.append(
            f"\nperplexity on {report['eval_text']} ({report['eval_tokens']} tokens)"
            + (f", exact match on {report['test_examples']} test examples" if report["test_examples"] else "")
        )
    kind = "merged bf16" if report["quantize"] == "none" else report["quantize"].upper()
    lines.append(f"{kind} checkpoint and report.json in {report['out']}/")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command


def _check_options(o: MergeOptions, adapter_dir: Path, out: Path) -> None:
    if o.quantize not in METHODS:
        raise MergeError(f"--quantize must be one of {', '.join(METHODS)}, got {o.quantize!r}")
    if o.merge_into not in ("nf4", "original"):
        raise MergeError(f"--merge-into must be nf4 or original, got {o.merge_into!r}")
    if o.quantize != "none" and o.bits != 4:
        raise MergeError(
            f"--bits {o.bits}: GPTQ v1 and AWQ gemm checkpoints are written with 4 bits "
            "(other widths only for the in-memory --report of --quantize none)"
        )
    if o.act_order and o.quantize == "awq":
        raise MergeError("--act-order applies to GPTQ; AWQ's gemm layout has no g_idx")
    if o.calibration_samples <= 0 or o.calibration_seq_len <= 0:
        raise MergeError("--calibration-samples and --calibration-seq-len must be positive")
    if out.resolve() == adapter_dir.resolve() or out.resolve() in adapter_dir.resolve().parents:
        raise MergeError(f"--out {out} would replace the adapter directory {adapter_dir}")
    if o.evaluate and not Path(o.eval_text).is_file():
        raise MergeError(f"held-out text {o.eval_text} not found: pass --eval-text PATH (or --no-eval)")
    check_output_dir(out, o.overwrite)


def _check_group_size(shapes: dict[str, tuple[int, int]], group_size: int) -> None:
    if group_size == -1:
        return
    if group_size <= 0:
        raise MergeError(f"--group-size must be -1 or positive, got {group_size}")
    for path, (n, k) in shapes.items():
        if k % group_size:
            fits = [g for g in (32, 64, 128) if all(kk % g == 0 for _, kk in shapes.values())]
            raise MergeError(
                f"--group-size {group_size} does not divide in_features K={k} of {path} [N={n}, K={k}]"
                + (f"; group sizes that fit every layer: {fits}" if fits else "")
            )


def _passes(o: MergeOptions) -> tuple[QuantSpec | None, list[QuantSpec | None]]:
    """The exported model's spec (None: merged bf16) and every model to build, in report order."""

    def spec(method: str, sym: bool) -> QuantSpec:
        return QuantSpec(method, o.bits, o.group_size, sym, o.act_order and method == "gptq", o.damp_percent)

    chosen = None if o.quantize == "none" else spec(o.quantize, o.sym and o.quantize != "awq")
    if not o.report:
        return chosen, [chosen]
    # RTN on each grid is the baseline of the quantizer beside it; it appears once when --no-sym.
    return chosen, list(
        dict.fromkeys([None, spec("rtn", o.sym), spec("gptq", o.sym), spec("rtn", False), spec("awq", False)])
    )


def merge(options: MergeOptions) -> dict:
    """Merge, quantize, export and evaluate as ``options`` say; returns the report (also DIR/report.json)."""
    o = options
    adapter_dir, out = Path(o.adapter_dir), Path(o.out)
    _check_options(o, adapter_dir, out)
    adapter = read_adapter(adapter_dir)
    base_name = o.base or adapter.base
    if o.base and o.base != adapter.base:
        log.warning("merging an adapter trained on %s into %s", adapter.base, o.base)
    source = resolve_source(base_name, adapter.gguf_file if base_name == adapter.base else None)
    config = load_config(source)
    check_supported(config)
    shapes = linear_shapes(skeleton_model(config, torch.float32))
    check_adapter_fits(adapter, shapes, base_name)
    chosen, passes = _passes(o)
    if any(s is not None for s in passes):
        _check_group_size(shapes, o.group_size)
    if chosen is not None:
        for problem in marlin_problems(shapes, o.group_size, chosen.symmetric or chosen.method == "awq"):
            log.warning(problem)

    tokenizer = _tokenizer(adapter_dir, source)
    calibration, calibration_info = None, None
    if any(s is not None and s.method in ("gptq", "awq") for s in passes):
        calibration, calibration_info = _calibration(o, adapter, tokenizer)
    evaluation = None
    if o.evaluate:
        eval_ids = torch.tensor(tokenizer(Path(o.eval_text).read_text(encoding="utf-8"))["input_ids"])
        max_new_tokens = adapter.recipe.eval.max_new_tokens if adapter.recipe else 64
        examples = load_test_examples(adapter.recipe, o.test_examples)
        evaluation = Evaluation(
            tokenizer, eval_ids, examples, max_new_tokens, load_validation(adapter.recipe, tokenizer)
        )

    device = torch.device(o.device) if o.device else default_device()
    compute_dtype = resolve_compute_dtype("auto", device)
    nf4 = None
    if o.merge_into == "nf4" or evaluation is not None:
        nf4 = load_quantized(source, device=device, compute_dtype=compute_dtype, progress=o.progress)
        if device.type == "cuda":
            nf4.model.layers.to("cpu")  # one layer at a time goes back to the device (NF4Weights)

    def base() -> BaseWeights:
        return NF4Weights(nf4, device) if o.merge_into == "nf4" else CheckpointWeights(source, device)

    fmt = "bf16" if chosen is None else chosen.checkpoint
    with CheckpointWriter(out, fmt, o.overwrite, o.max_shard_bytes) as writer:
        results = []
        for spec in passes:
            start = time.perf_counter()
            collector = _Collector(torch.bfloat16 if spec is None else torch.float16, compute_dtype)
            for part in merged_model(config, base(), adapter, spec, calibration, device, compute_dtype, o.progress):
                if spec == chosen:
                    writer.add(part)
                if evaluation is not None:
                    collector.add(part)
            row = {
                "model": "merged bf16" if spec is None else spec.label,
                "seconds": round(time.perf_counter() - start, 1),
            }
            if evaluation is not None:
                row |= evaluation(stock_model(config, collector.state, device, compute_dtype))
            del collector
            log.info("%s", row)
            results.append(row)
        if evaluation is not None:
            results.insert(0, {"model": "NF4 + adapter", **evaluation(_with_adapter(nf4.to(device), adapter))})
        report = {
            "adapter": str(adapter_dir),
            "base": base_name,
            "merge_into": o.merge_into,
            "quantize": o.quantize,
            "out": str(out),
            "device": str(device),
            "quantization": None if chosen is None else asdict(chosen),
            "calibration": calibration_info,
            "eval_text": o.eval_text if evaluation is not None else None,
            "eval_tokens": int(evaluation.eval_ids.numel()) if evaluation is not None else 0,
            "test_examples": len(evaluation.examples) if evaluation is not None else 0,
            "results": results,
        }
        writer.write_json(REPORT_FILE, report)
        writer.finish(config, tokenizer, _generation_config(source, config), _quantization_config(chosen))
    return report


def _tokenizer(adapter_dir: Path, source: ModelSource):
    """The tokenizer training saved beside the adapter, else the base model's; with a pad token."""
    from transformers import AutoTokenizer

    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    else:
        tokenizer = load_tokenizer(source)
    if tokenizer.pad_token is None:  # batched generation pads
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _with_adapter(nf4: nn.Module, adapter: Adapter) -> nn.Module:
    """The NF4 model with the adapter's LoRA layers on it, as training evaluated it."""
    cfg = adapter.config
    targets = sorted({path.rpartition(".")[2] for path in adapter.lora})
    add_lora(nf4, cfg["r"], cfg["lora_alpha"], 0.0, targets, cfg.get("use_rslora", False))
    load_adapter_weights(nf4, adapter.directory)
    return nf4


def _quantization_config(spec: QuantSpec | None) -> dict | None:
    if spec is None:
        return None
    if spec.checkpoint == "gptq":
        return gptq_quantization_config(spec.bits, spec.group_size, spec.symmetric, spec.act_order, spec.damp_percent)
    return awq_quantization_config(spec.bits, spec.group_size)


def _calibration(o: MergeOptions, adapter: Adapter, tokenizer) -> tuple[Tensor, dict]:
    """Calibration windows from --calibration, else from the training data the recipe names."""
    from qlora_kit.pipelines.calibration import calibration_windows

    if o.calibration:
        source, fmt, split, system_prompt = o.calibration, "auto", "train", None
    elif adapter.recipe is not None:
        data = adapter.recipe.data
        source, fmt, split, system_prompt = data.train, data.format, data.split, data.system_prompt
    else:
        raise MergeError(f"{adapter.directory} has no {RECIPE_FILE} naming its training data: pass --calibration PATH")
    ids = calibration_windows(
        tokenizer, source, o.calibration_samples, o.calibration_seq_len, fmt, split, system_prompt
    )
    info = {
        "source": str(source),
        "samples": o.calibration_samples,
        "seq_len": o.calibration_seq_len,
        "tokens": int(ids.numel()),
    }
    return ids, info


def _generation_config(source: ModelSource, config):
    from transformers import GenerationConfig

    if source.gguf_file is None and (source.directory / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source.directory)
    return GenerationConfig.from_model_config(config)
