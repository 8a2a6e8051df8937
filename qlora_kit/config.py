"""Recipes: YAML files (+ ``key=value`` overrides) -> a validated, typed :class:`Recipe`.

Its length (one file over ~400 lines): the whole recipe schema, its choices and ranges, and the
checks across sections live together so that every key is defined and validated in one place.

The schema is a tree of dataclasses read through OmegaConf structured configs, which
converts and type-checks values. Everything is checked here, before any model is
loaded, and every error names the dotted key and where it was set (``file:line`` or
the command-line override). Every key, its default and meaning: the README's recipe reference.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from qlora_kit.errors import UserInputError
from qlora_kit.paths import resolve_paths

log = logging.getLogger(__name__)

# The rules of eval.match; pipelines/matching.py implements each (a test checks it).
MATCH_RULES = ("exact", "normalized", "json")


class RecipeError(UserInputError):
    """A recipe that cannot be used; the message says which key and where."""


@dataclass
class ModelSection:
    """model: the base model and how it computes."""

    name_or_path: str = "smollm2"
    gguf_file: str | None = None
    compute_dtype: str = "auto"
    attn_implementation: str = "sdpa"


@dataclass
class QuantizationSection:
    """quantization: how the frozen base weights are dequantized (always NF4 + double quantization, blocks of 64)."""

    kernel: str = "auto"


@dataclass
class LoraSection:
    """lora: the trained adapters."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear" or a list of module names: OmegaConf has no Union, so Any + _validate.
    target_modules: Any = "all-linear"
    use_rslora: bool = False


@dataclass
class QATSection:
    """qat: optional quantization-aware training (fake-quant of the weights)."""

    enabled: bool = False
    format: str = "int"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    start_step: int = 0
    activation_bits: int | None = None


@dataclass
class DataSection:
    """data: where the examples come from and how they become tokens."""

    train: str = MISSING
    validation: str | None = None
    validation_split: float = 0.0
    test: str | None = None
    format: str = "auto"
    split: str = "train"
    max_seq_len: int = 1024
    packing: bool = False
    train_on_prompt: bool = False
    on_bad_row: str = "error"
    system_prompt: str | None = None


@dataclass
class TrainingSection:
    """training: optimizer, schedule, steps, checkpoints."""

    # What the run optimizes: sft (next-token loss) or a preference method on pairs (dpo, orpo; the preference section).
    method: str = "sft"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2.0e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    optimizer: str = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    # The fast path (fused ops and LoRA, chunked loss); false: the plain PyTorch path.
    fused_kernels: bool = True
    # The last N decoder layers keep their activations instead of recomputing them (speed for memory).
    uncheckpointed_layers: int = 0
    # The frozen base's GEMMs in FP8 e4m3 (qlora_kit/quant/fp8.py; Ada/Hopper GPUs): faster, slightly perturbed
    # base. true: every one; "backward": those of the backward pass only (recompute, input gradients), the
    # forward (the loss) in full precision. Any + _RANGES, as for mlp_chunk_tokens.
    fp8_base_matmul: Any = False
    # Memory levers for models near the GPU's size (see qlora_kit/model/offload.py, pipelines/optim.py).
    optimizer_in_backward: bool = False
    # true: the checkpoints' layer inputs wait in CPU memory (qlora_kit/model/offload.py). "auto": true, with
    # recompute_attention and recompute_projections false, for SFT on one CUDA GPU when half the host's
    # available memory holds it all (the fastest and leanest setting measured, docs/performance.md); else false.
    # The three are Any + _RANGES (bool or "auto"), as mlp_chunk_tokens.
    offload_activations: Any = "auto"
    # false (with offload_activations): the attention output and logsumexp are kept in CPU memory with the
    # checkpoint and the recompute skips attention (qlora_kit/modules/flash_attention.py): long context.
    recompute_attention: Any = "auto"
    # false (with offload_activations): the q, k, v and o projections' outputs too; the recompute skips their
    # GEMMs (qlora_kit/modules/kept.py).
    recompute_projections: Any = "auto"
    offload_embeddings: bool = False
    # With optimizer_in_backward: LoRA weights in CPU memory, on the GPU (bf16) only while their layer runs.
    offload_adapters: bool = False
    # Long context: each MLP in chunks of this many tokens (qlora_kit/modules/tiled_mlp.py); 0: off; or "auto".
    # OmegaConf has no Union, so Any + _RANGES.
    mlp_chunk_tokens: Any = 0
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int = 100
    save_total_limit: int = 3
    resume: bool = False

    @property
    def sequences_per_row(self) -> int:
        """Sequences a batch row holds: 1 for SFT, 2 for a preference pair (chosen and rejected)."""
        return 1 if self.method == "sft" else 2


@dataclass
class PreferenceSection:
    """preference: DPO and ORPO on chosen/rejected pairs (training.method dpo or orpo)."""

    beta: float = 0.1
    # One of TRL's DPO loss types, or a list of them summed with loss_weights ([sigmoid, sft]: RPO).
    # OmegaConf has no Union, so Any + _validate_loss_type.
    loss_type: Any = "sigmoid"
    # With a list of loss types, the weight of each; null: 1.0 each.
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    # Prompts longer than this keep their last tokens; null: only data.max_seq_len cuts.
    max_prompt_len: int | None = None
    # The adapter the trained one starts from (e.g. an SFT run's output.dir); null: fresh LoRA, i.e. the base.
    init_adapter: str | None = None
    # DPO's reference: null is the base with the adapters switched off; an adapter directory needs precompute_reference.
    reference_adapter: str | None = None
    # The reference log-probabilities once, before training, instead of a reference forward in every step.
    precompute_reference: bool = False

    def losses(self) -> tuple[list[str], list[float]]:
        """The DPO loss types and their weights, as TRL's ``DPOConfig.loss_type`` and ``loss_weights`` hold them."""
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        return types, list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(types)


@dataclass
class EvalSection:
    """eval: generation on the test split."""

    # None: the longest reference test answer in tokens plus a margin (pipelines/evaluate.py).
    max_new_tokens: int | None = None
    max_test_examples: int | None = None
    match: str = "exact"


@dataclass
class OutputSection:
    """output: where the run writes."""

    dir: str = "outputs/run"
    overwrite: bool = False
    report_to: str = "tensorboard"


@dataclass
class Recipe:
    """A whole recipe. ``extends`` is always None once loaded: the chain is merged in."""

    extends: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    lora: LoraSection = field(default_factory=LoraSection)
    qat: QATSection = field(default_factory=QATSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    preference: PreferenceSection = field(default_factory=PreferenceSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)


# TRL DPOTrainer's loss types that need no setting beyond the preference section (discopop's tau has none).
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "sft",
    "sigmoid_norm",
)

# The tree of valid keys, for unknown-key checks and suggestions.
_DEFAULTS = dataclasses.asdict(Recipe())

_CHOICES: dict[str, tuple] = {
    "model.compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "quantization.kernel": ("auto", "triton", "torch"),
    "qat.format": ("int", "nf4"),
    "qat.activation_bits": (None, 8),
    "data.format": ("auto", "messages", "prompt_completion", "alpaca", "text", "preference"),
    "data.on_bad_row": ("error", "skip"),
    # Schedulers of transformers that need no extra arguments.
    "training.lr_scheduler": (
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
    ),
    "training.optimizer": ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"),
    "training.method": ("sft", "dpo", "orpo"),
    "eval.match": MATCH_RULES,
    "output.report_to": ("tensorboard", "none"),
}

# Range checks, as (test, what the message says is expected).
_POSITIVE = (lambda v: v > 0, "> 0")
_POSITIVE_OR_NULL = (lambda v: v is None or v > 0, "null or > 0")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(
        (
            "lora.r",
            "lora.alpha",
            "qat.group_size",
            "data.max_seq_len",
            "training.epochs",
            "training.batch_size",
            "training.gradient_accumulation_steps",
            "training.learning_rate",
            "training.logging_steps",
            "training.save_steps",
            "training.save_total_limit",
        ),
        _POSITIVE,
    ),
    **dict.fromkeys(("training.eval_steps", "eval.max_new_tokens", "eval.max_test_examples"), _POSITIVE_OR_NULL),
    "preference.beta": _POSITIVE,
    "preference.max_prompt_len": _POSITIVE_OR_NULL,
    "preference.label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    **dict.fromkeys(("lora.dropout", "data.validation_split", "training.warmup_ratio"), _FRACTION),
    **dict.fromkeys(("qat.start_step", "training.weight_decay", "training.uncheckpointed_layers"), _NON_NEGATIVE),
    "training.max_grad_norm": (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    "training.fp8_base_matmul": (
        lambda v: isinstance(v, bool) or v == "backward",
        "true, false, or 'backward' (only the backward pass: recompute and input gradients)",
    ),
    **dict.fromkeys(
        ("training.offload_activations", "training.recompute_attention", "training.recompute_projections"),
        (lambda v: isinstance(v, bool) or v == "auto", "true, false, or 'auto'"),
    ),
    "training.mlp_chunk_tokens": (
        lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
        "0 (off), a number of tokens > 0, or 'auto'",
    ),
    "training.max_steps": (lambda v: v == -1 or v > 0, "-1 (use epochs) or > 0"),
    "qat.bits": (lambda v: 2 <= v <= 8, "in [2, 8]"),
    "lora.target_modules": (
        lambda v: (
            v == "all-linear" or (isinstance(v, list) and len(v) > 0 and all(isinstance(m, str) and m for m in v))
        ),
        "'all-linear' or a non-empty list of module names, e.g. [q_proj, v_proj]",
    ),
    "data.train": (lambda v: v != "", "a file path or a hub dataset name"),
    "output.dir": (lambda v: v != "", "a non-empty path"),
}

# Keys that had one allowed value, the bitsandbytes layout qlora-kit reads and writes. The
# recipe.yaml of an adapter trained earlier still sets them (and `qlora-kit merge` loads it), so
# that value loads with a warning; any other is an error.
_RETIRED: dict[str, Any] = {
    "quantization.quant_type": "nf4",
    "quantization.double_quant": True,
    "quantization.blocksize": 64,
}

# A layer is one source of values: its nested dict, a function key -> where it was set, and the
# folder of its recipe file (None for a command-line override), which relative paths fall back to.
_Layer = tuple[dict, Callable[[str], str], Path | None]


def load_recipe(path: str | Path, overrides: Sequence[str] = (), check_files: bool = False) -> Recipe:
    """Load ``path`` (following ``extends:``), apply ``key=value`` overrides, validate.

    Precedence: base recipes < this file < overrides. Raises RecipeError on any problem.
    Relative input paths resolve as :mod:`qlora_kit.paths` says; with ``check_files`` (what
    the CLI does before a run) a missing input file raises MissingFileError naming its key.
    """
    layers = _read_chain(Path(path), ()) + [_parse_override(text) for text in overrides]
    cfg, origins, folders = OmegaConf.structured(Recipe), {}, {}
    for data, locate, folder in layers:
        _drop_retired(data, locate)
        _check_keys(data, _DEFAULTS, "", locate)
        try:
            cfg = OmegaConf.merge(cfg, data)
        except (OmegaConfBaseException, TypeError) as e:  # a value of the wrong type (TypeError: a mapping for a list)
            key = getattr(e, "full_key", None) or _rejected_key(cfg, data)
            why = str(e).splitlines()[0]
            if isinstance(e, TypeError):
                why += " (a mapping where a list or a value belongs, or a list where a mapping does)"
            raise RecipeError(f"{locate(key)}: invalid value for '{key}': {why}") from None
        keys = [key for key, _ in _recipe_keys(data)]
        origins.update({key: locate(key) for key in keys})
        folders.update({key: folder for key in keys})

    def where(key: str) -> str:
        return origins.get(key, str(path))

    try:
        recipe = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        key = e.full_key
        raise RecipeError(
            f"{where(key)}: missing required value '{key}' — set it in the recipe or on the command line ({key}=...)"
        ) from None
    except OmegaConfBaseException as e:  # e.g. a ${...} interpolation that does not resolve
        raise RecipeError(f"{where(e.full_key)}: invalid value for '{e.full_key}': {str(e).splitlines()[0]}") from None
    _validate(recipe, where)
    resolve_paths(recipe, where, {key: folder for key, folder in folders.items() if folder is not None}, check_files)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain nested dicts and lists (YAML/JSON-ready)."""
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML; ``load_recipe`` on it gives an equal recipe."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def _read_chain(path: Path, chain: tuple[Path, ...]) -> list[_Layer]:
    """The layers of ``path`` and its ``extends:`` bases, the deepest base first."""
    if path.resolve() in [p.resolve() for p in chain]:
        raise RecipeError("extends cycle: " + " -> ".join(map(str, (*chain, path))))
    data, lines = _read_yaml(path)

    def where(key: str) -> str:
        return f"{path}:{lines[key]}" if key in lines else str(path)

    base = data.pop("extends", None)
    if base is None:
        return [(data, where, path.parent)]
    if not isinstance(base, str):
        raise RecipeError(f"{where('extends')}: 'extends' must be a path, got {base!r}")
    base_path = path.parent / base  # relative to the extending file, not the cwd
    if not base_path.is_file():
        raise RecipeError(f"{where('extends')}: extends: recipe file not found: {base_path}")
    return _read_chain(base_path, (*chain, path)) + [(data, where, path.parent)]


def _read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """The file's mapping and the line of every dotted key in it (from YAML node marks)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"cannot read recipe file {path}: {e.strerror}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: the top level must be a mapping of sections (model:, lora:, ...), got {type(data).__name__}"
        )
    lines: dict[str, int] = {}
    _node_lines(node, "", lines, path)
    return data, lines


def _node_lines(node: yaml.Node | None, prefix: str, lines: dict[str, int], path: Path) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key, line = prefix + str(key_node.value), key_node.start_mark.line + 1
        if key in lines:  # plain YAML would silently keep the last one
            raise RecipeError(f"{path}:{line}: duplicate key '{key}' (also on line {lines[key]})")
        lines[key] = line
        _node_lines(value_node, key + ".", lines, path)


def _parse_override(text: str) -> _Layer:
    """``lora.r=8`` -> ({'lora': {'r': 8}}, ...); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or "" in key.split("."):
        raise RecipeError(f"bad command-line override `{text}`: expected key=value, e.g. lora.r=8")
    origin = f"command-line override `{text}`"
    if key == "extends":
        raise RecipeError(f"{origin}: 'extends' can only be set in a recipe file")
    try:
        data = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise RecipeError(f"{origin}: cannot parse the value: {getattr(e, 'problem', e)}") from None
    for part in reversed(key.split(".")):
        data = {part: data}
    return data, (lambda _key: origin), None


def _drop_retired(data: dict, where: Callable[[str], str]) -> None:
    """Remove the retired keys from ``data``: their one value with one warning line, else a RecipeError."""
    dropped = []
    for key, only in _RETIRED.items():
        section, _, name = key.partition(".")
        values = data.get(section)
        if not isinstance(values, dict) or name not in values:
            continue
        value = values.pop(name)
        if value != only or type(value) is not type(only):
            raise RecipeError(
                f"{where(key)}: invalid value {value!r} for '{key}' — the base weights are always NF4 with double "
                f"quantization in blocks of 64 (the bitsandbytes layout); '{key}' is deprecated: remove it"
            )
        dropped.append(key)
    if dropped:
        log.warning("%s: deprecated keys with no effect, remove them: %s", where(dropped[0]), ", ".join(dropped))


def _check_keys(data: dict, schema: dict, prefix: str, where: Callable[[str], str]) -> None:
    """Unknown keys and sections that are not mappings, with the closest valid key."""
    for name, value in data.items():
        key = prefix + str(name)
        if str(name) not in schema:
            hint = _closest_key(key)
            raise RecipeError(f"{where(key)}: unknown key '{key}'" + (f" — did you mean '{hint}'?" if hint else ""))
        section = schema[str(name)]
        if isinstance(section, dict):
            if value is None:  # a section whose keys are all commented out
                value = data[name] = {}
            if not isinstance(value, dict):
                raise RecipeError(
                    f"{where(key)}: '{key}' is a section and must be a mapping "
                    f"of keys ({', '.join(section)}), got {value!r}"
                )
            _check_keys(value, section, key + ".", where)


def _closest_key(key: str) -> str | None:
    """The valid key closest in spelling; else one with the same last part (wrong section)."""
    valid = list(_leaf_keys(_DEFAULTS, "", sections=True))
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return close[0]
    leaf = key.rpartition(".")[2]
    same_leaf = [k for k in valid if k.rpartition(".")[2] == leaf]
    return same_leaf[0] if same_leaf else None


def _recipe_keys(data: dict, schema: dict = _DEFAULTS, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The recipe keys a layer's nested dict sets, with their values (a mapping given as a key's value,
    e.g. ``lora.target_modules={x: 1}``, is that key's value, not keys below it)."""
    for name, value in data.items():
        key, section = prefix + str(name), schema.get(str(name))
        if isinstance(section, dict) and isinstance(value, dict):
            yield from _recipe_keys(value, section, key + ".")
        else:
            yield key, value


def _rejected_key(cfg, data: dict) -> str:
    """The first key of ``data`` that does not merge into ``cfg`` on its own ("" if each does)."""
    for key, value in _recipe_keys(data):
        for part in reversed(key.split(".")):
            value = {part: value}
        try:
            OmegaConf.merge(cfg, value)
        except (OmegaConfBaseException, TypeError):
            return key
    return ""


def _leaf_keys(data: dict, prefix: str, sections: bool = False) -> Iterator[str]:
    """Dotted keys of a nested dict (lists are leaves); section keys too if ``sections``."""
    for name, value in data.items():
        key = prefix + str(name)
        if isinstance(value, dict):
            if sections:
                yield key
            yield from _leaf_keys(value, key + ".", sections)
        else:
            yield key


def _validate(recipe: Recipe, where: Callable[[str], str]) -> None:
    """Choices and ranges that types alone cannot express."""

    def get(key: str) -> Any:
        return reduce(getattr, key.split("."), recipe)

    for key, allowed in _CHOICES.items():
        if get(key) not in allowed:
            names = ", ".join("null" if a is None else str(a) for a in allowed)
            raise RecipeError(f"{where(key)}: invalid value {get(key)!r} for '{key}' — must be one of: {names}")
    for key, (ok, expected) in _RANGES.items():
        if not ok(get(key)):
            raise RecipeError(f"{where(key)}: invalid value {get(key)!r} for '{key}' — must be {expected}")
    t = recipe.training
    if t.optimizer_in_backward and t.gradient_accumulation_steps != 1:
        raise RecipeError(
            f"{where('training.optimizer_in_backward')}: training.optimizer_in_backward steps on every "
            "micro-batch, so training.gradient_accumulation_steps must be 1"
        )
    if t.offload_adapters and not t.optimizer_in_backward:
        raise RecipeError(
            f"{where('training.offload_adapters')}: training.offload_adapters steps each layer's "
            "adapters while they are on the GPU, inside backward: set training.optimizer_in_backward=true"
        )
    if t.offload_activations is True and not t.gradient_checkpointing:
        raise RecipeError(
            f"{where('training.offload_activations')}: training.offload_activations offloads the "
            "checkpoints of gradient checkpointing: set training.gradient_checkpointing=true"
        )
    if t.recompute_attention is False and t.offload_activations is not True:
        raise RecipeError(
            f"{where('training.recompute_attention')}: training.recompute_attention=false keeps the attention "
            "output with the offloaded checkpoint: set training.offload_activations=true"
        )
    if t.recompute_projections is False and t.offload_activations is not True:
        raise RecipeError(
            f"{where('training.recompute_projections')}: training.recompute_projections=false keeps the "
            "projections' outputs with the offloaded checkpoint: set training.offload_activations=true"
        )
    if t.recompute_attention is False and recipe.model.attn_implementation != "sdpa":
        raise RecipeError(
            f"{where('training.recompute_attention')}: training.recompute_attention: false keeps the output of "
            f"sdpa attention, not {recipe.model.attn_implementation!r} (model.attn_implementation): set "
            "model.attn_implementation=sdpa or training.recompute_attention=true"
        )
    if t.recompute_attention is False and t.fp8_base_matmul == "backward":
        raise RecipeError(
            f"{where('training.recompute_attention')}: training.recompute_attention=false reuses the forward's "
            "attention output with the recomputed q, k and v, which fp8_base_matmul=backward recomputes in e4m3, "
            "not as the forward computed them: set one of them back"
        )
    if recipe.qat.enabled and recipe.lora.dropout > 0:
        raise RecipeError(
            f"{where('lora.dropout')}: invalid value {recipe.lora.dropout!r} for 'lora.dropout' — "
            "QAT trains the adapters through the merged weight, where there is no branch to drop "
            "out: set lora.dropout to 0 or qat.enabled to false"
        )
    if recipe.qat.format == "nf4" and recipe.qat.bits != 4:
        raise RecipeError(
            f"{where('qat.bits')}: invalid value {recipe.qat.bits!r} for "
            "'qat.bits' — qat.format nf4 is a 4-bit format, so bits must be 4"
        )
    _validate_preference(recipe, where)


def _validate_preference(recipe: Recipe, where: Callable[[str], str]) -> None:
    """The preference section against training.method and the data section."""
    method, p, d = recipe.training.method, recipe.preference, recipe.data

    def refuse(key: str, why: str) -> None:
        raise RecipeError(f"{where(key)}: '{key}' {why}")

    _validate_loss_type(p.loss_type, where)
    if method != "orpo":  # ORPO refuses any weights below, with its own reason
        _validate_loss_weights(p, where)
    if method == "sft":
        for key, value in (
            ("preference.init_adapter", p.init_adapter),
            ("preference.reference_adapter", p.reference_adapter),
        ):
            if value is not None:
                refuse(key, "applies to training.method dpo or orpo; an SFT run starts from fresh adapters")
        return

    if d.packing:
        refuse(
            "data.packing",
            f"cannot be true with training.method {method}: a preference pair is scored as two "
            "whole rows (prompt + chosen, prompt + rejected), which packing would merge; set data.packing=false",
        )
    if d.format not in ("auto", "preference"):
        refuse(
            "data.format",
            f"is {d.format!r}, but training.method {method} reads prompt/chosen/rejected pairs: "
            "set data.format to auto or preference",
        )
    if method == "dpo" and d.train_on_prompt:
        refuse("data.train_on_prompt", "applies to ORPO's NLL term; DPO scores the answers only: set it to false")
    if p.max_prompt_len is not None and p.max_prompt_len >= d.max_seq_len:
        refuse(
            "preference.max_prompt_len",
            f"({p.max_prompt_len}) must be below data.max_seq_len ({d.max_seq_len}), "
            "which leaves no room for the answers",
        )
    if method == "orpo":
        for key, value, default in (
            ("preference.loss_type", p.loss_type, "sigmoid"),
            ("preference.loss_weights", p.loss_weights, None),
            ("preference.reference_adapter", p.reference_adapter, None),
            ("preference.precompute_reference", p.precompute_reference, False),
            ("preference.label_smoothing", p.label_smoothing, 0.0),
        ):
            if value != default:
                refuse(
                    key,
                    f"is {value!r}, but ORPO has no reference model and one loss: leave it at {default!r} "
                    "or use training.method=dpo",
                )
        return
    if p.reference_adapter is not None and not p.precompute_reference:
        refuse(
            "preference.reference_adapter",
            "needs preference.precompute_reference=true: the one NF4 base in "
            "memory holds one set of adapters, so the reference adapter's log-probabilities are computed once, "
            "before training",
        )
    if "exo_pair" in p.losses()[0] and p.label_smoothing == 0:
        refuse("preference.label_smoothing", "must be > 0 for preference.loss_type exo_pair (its target is 1 - it)")


def _validate_loss_type(value: Any, where: Callable[[str], str]) -> None:
    """preference.loss_type: one of TRL's DPO loss types, or a non-empty list of different ones."""
    key, names = "preference.loss_type", ", ".join(DPO_LOSS_TYPES)
    if isinstance(value, str) and value in DPO_LOSS_TYPES:
        return
    if not isinstance(value, list) or not value:
        raise RecipeError(
            f"{where(key)}: invalid value {value!r} for '{key}' — must be one of: {names}; "
            "or a list of them, summed with preference.loss_weights, e.g. [sigmoid, sft]"
        )
    for i, name in enumerate(value):
        if not isinstance(name, str) or name not in DPO_LOSS_TYPES:
            raise RecipeError(
                f"{where(key)}: invalid value {value!r} for '{key}' — {name!r} is not one of TRL's DPO loss types: "
                f"{names}"
            )
        if name in value[:i]:
            raise RecipeError(
                f"{where(key)}: invalid value {value!r} for '{key}' — {name!r} is listed twice: list each loss once "
                "and set its weight in preference.loss_weights"
            )


def _validate_loss_weights(p: PreferenceSection, where: Callable[[str], str]) -> None:
    """preference.loss_weights: null, or one weight > 0 for each loss of a list of loss types."""
    key, weights = "preference.loss_weights", p.loss_weights
    if weights is None:
        return
    types = p.losses()[0]
    if len(types) == 1:
        raise RecipeError(
            f"{where(key)}: '{key}' weights the losses of a list of loss types; preference.loss_type is the one loss "
            f"{p.loss_type!r}: leave it null (to scale that loss, scale training.learning_rate)"
        )
    if len(weights) != len(types):
        raise RecipeError(
            f"{where(key)}: '{key}' has {len(weights)} weight{'s' * (len(weights) != 1)} for the {len(types)} "
            f"losses of preference.loss_type {types}: give one weight per loss, in the same order"
        )
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise RecipeError(f"{where(key)}: invalid value {weights!r} for '{key}' — every weight must be a number > 0")
