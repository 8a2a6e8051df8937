"""``qlora-kit merge``: merge LoRA adapters into their base, re-quantize (RTN / GPTQ / AWQ / GGUF), export and evaluate.

This module holds the options, their checks and the command; the data flow, one module each:

    model/adapters.py           read_adapter: the adapter's LoRA weights and scale (one PEFT parser)
    pipelines/base_weights.py   the base weights, one decoder layer at a time (NF4 or the original)
    pipelines/layerwise.py      the driver: merge -> quantize, one decoder layer at a time
    model/plans.py              per family: the layer's linears, GPTQ's order, AWQ's scaling groups
    pipelines/quantize.py       the RTN / GPTQ / AWQ pass of one layer (activations.py: its inputs)
    pipelines/export.py         the checkpoint writer, a shard every few layers
    pipelines/merge_gguf.py     --quantize gguf: the GGUF file and its directory (export_gguf.py writes the file)
    pipelines/evaluate.py       the report: every model measured as a stock transformers model
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from qlora_kit.errors import UserInputError
from qlora_kit.model.adapters import (
    ADAPTER_WEIGHTS,
    RECIPE_FILE,
    Adapter,
    AdapterError,
    add_lora,
    read_adapter,
    set_lora_weights,
)
from qlora_kit.model.load import check_supported, default_device, load_quantized, resolve_compute_dtype
from qlora_kit.model.sources import ModelSource, load_config, load_tokenizer, resolve_source
from qlora_kit.pipelines.base_weights import BaseWeights, CheckpointWeights, NF4Weights
from qlora_kit.pipelines.evaluate import (
    GENERATIONS_FILE,
    Collector,
    Evaluation,
    generation_budget,
    load_test_examples,
    load_validation,
    stock_model,
    write_generations,
)
from qlora_kit.pipelines.export import (
    DEFAULT_SHARD_BYTES,
    CheckpointWriter,
    awq_quantization_config,
    check_output_dir,
    gptq_quantization_config,
    marlin_problems,
)
from qlora_kit.pipelines.layerwise import linear_shapes, merged_model, skeleton_model
from qlora_kit.pipelines.matching import check_references
from qlora_kit.pipelines.merge_gguf import GGUF_TYPES, GGUFDirectoryWriter, GGUFSpec
from qlora_kit.pipelines.quantize import QuantSpec

# The data stack (datasets, recipes) is imported where calibration or test data is read, so the
# driver (layerwise.py) needs only torch and transformers (scripts/bench_quantize.py feeds it token ids).
log = logging.getLogger("qlora_kit")

# The held-out essays shipped in the repository (found from any working directory).
DEFAULT_EVAL_TEXT = str(Path(__file__).resolve().parents[2] / "examples" / "heldout" / "essays.txt")
REPORT_FILE = "report.json"
METHODS = ("none", "rtn", "gptq", "awq", "gguf")
# The int-grid options of RTN / GPTQ / AWQ, which a GGUF file type fixes by itself.
_INT_GRID_FLAGS = {
    "bits": "--bits",
    "group_size": "--group-size",
    "sym": "--no-sym",
    "act_order": "--act-order",
    "damp_percent": "--damp-percent",
}


class MergeError(UserInputError):
    """Merge options or inputs that cannot be used; the message says which and why."""


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
    eval_text: str | None = None  # None: DEFAULT_EVAL_TEXT
    test_examples: int | None = None
    overwrite: bool = False
    device: str | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    progress: bool = True
    gguf_type: str | None = None  # --quantize gguf: f16, bf16, q8_0, q4_0, ..., q4_k_m, q6_k
    imatrix: bool = False  # --quantize gguf: weight the rounding error by llama.cpp's importance matrix


# ---------------------------------------------------------------------------------------------
# Checks


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


def _check_options(o: MergeOptions, adapter_dir: Path, out: Path) -> None:
    if o.quantize not in METHODS:
        raise MergeError(f"--quantize must be one of {', '.join(METHODS)}, got {o.quantize!r}")
    if o.merge_into not in ("nf4", "original"):
        raise MergeError(f"--merge-into must be nf4 or original, got {o.merge_into!r}")
    if o.quantize == "gguf":
        _check_gguf_options(o)
    elif o.gguf_type is not None or o.imatrix:
        raise MergeError("--gguf-type and --imatrix apply to --quantize gguf only")
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


def _check_gguf_options(o: MergeOptions) -> None:
    if o.gguf_type not in GGUF_TYPES:
        got = "" if o.gguf_type is None else f", got {o.gguf_type!r}"
        raise MergeError(f"--quantize gguf needs --gguf-type, one of {', '.join(GGUF_TYPES)}{got}")
    defaults = MergeOptions.__dataclass_fields__
    given = [flag for key, flag in _INT_GRID_FLAGS.items() if getattr(o, key) != defaults[key].default]
    if given:
        raise MergeError(
            f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --quantize gguf: "
            f"the GGUF type ({o.gguf_type}) fixes the block size, bits and scales"
        )


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


def _passes(o: MergeOptions) -> tuple[QuantSpec | GGUFSpec | None, list[QuantSpec | GGUFSpec | None]]:
    """The exported model's spec (None: merged bf16) and every model to build, in report order."""
    if o.quantize == "gguf":
        chosen = GGUFSpec(o.gguf_type, o.imatrix)
        return chosen, [None, chosen] if o.report else [chosen]  # the merged bf16 model is the reference

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
    o = options if options.eval_text else replace(options, eval_text=DEFAULT_EVAL_TEXT)
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
    if any(isinstance(s, QuantSpec) for s in passes):
        _check_group_size(shapes, o.group_size)
    if isinstance(chosen, QuantSpec):
        for problem in marlin_problems(shapes, o.group_size, chosen.symmetric or chosen.method == "awq"):
            log.warning(problem)

    tokenizer = _tokenizer(adapter_dir, source)
    calibration, calibration_info = None, None
    if any(s is not None and s.calibrated for s in passes):
        calibration, calibration_info = _calibration(o, adapter, tokenizer)
    evaluation = None
    if o.evaluate:
        eval_ids = torch.tensor(tokenizer(Path(o.eval_text).read_text(encoding="utf-8"))["input_ids"])
        examples = load_test_examples(adapter.recipe, o.test_examples)
        match = adapter.recipe.eval.match if adapter.recipe else "exact"
        max_new_tokens = None
        if examples:  # checked and sized before any model loads, as training does
            check_references(match, examples)
            max_new_tokens = generation_budget(tokenizer, examples, adapter.recipe.eval.max_new_tokens)
        evaluation = Evaluation(
            tokenizer, eval_ids, examples, max_new_tokens, match, load_validation(adapter.recipe, tokenizer)
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
    exported = "merged bf16" if chosen is None else chosen.label
    if isinstance(chosen, GGUFSpec):
        writer = GGUFDirectoryWriter(out, config, tokenizer, chosen, adapter_dir.resolve().name, o.overwrite)
    else:
        writer = CheckpointWriter(out, fmt, o.overwrite, o.max_shard_bytes)
    with writer:
        results, tests = [], {}
        for spec in passes:
            start = time.perf_counter()
            # A GGUF export is measured from its written file (read_back), not from the driver's tensors.
            collector = (
                None
                if isinstance(spec, GGUFSpec)
                else Collector(torch.bfloat16 if spec is None else torch.float16, compute_dtype)
            )
            for part in merged_model(config, base(), adapter, spec, calibration, device, compute_dtype, o.progress):
                if spec == chosen:
                    writer.add(part)
                if evaluation is not None and collector is not None:
                    collector.add(part)
            label = "merged bf16" if spec is None else spec.label
            row = {"model": label, "seconds": round(time.perf_counter() - start, 1)}
            if evaluation is not None:
                if collector is None:
                    state = {k: v.to(compute_dtype) for k, v in writer.read_back().items()}
                else:
                    state = collector.state
                measured, tests[label] = evaluation(stock_model(config, state, device, compute_dtype))
                del state
                row |= measured
            del collector
            log.info("%s", row)
            results.append(row)
        if evaluation is not None:
            measured, tests["NF4 + adapter"] = evaluation(_with_adapter(nf4.to(device), adapter))
            results.insert(0, {"model": "NF4 + adapter", **measured})
        tested = evaluation is not None and bool(evaluation.examples)
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
            "max_new_tokens": evaluation.max_new_tokens if tested else None,
            "match": evaluation.match if tested else None,
            "exported": exported,
            "generations": GENERATIONS_FILE if tested else None,
            "results": results,
        }
        if isinstance(writer, GGUFDirectoryWriter):
            report["gguf_file"] = writer.file_name
        if tested:
            # Into the partial directory, like report.json: published only with the whole checkpoint.
            write_generations(writer.partial / GENERATIONS_FILE, {r["model"]: tests[r["model"]] for r in results})
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
    set_lora_weights(nf4, adapter.lora, adapter.directory / ADAPTER_WEIGHTS)
    return nf4


def _quantization_config(spec: QuantSpec | GGUFSpec | None) -> dict | None:
    if not isinstance(spec, QuantSpec):
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
