"""GGUF export of a Llama-family model (llama, mistral, qwen2, qwen3), written tensor by tensor.

Its length: llama.cpp's metadata keys, tensor names and tokenizer fields are one format;
splitting them would scatter the mapping a reader checks against the format.

A GGUF file is a header, the metadata, a table of tensor infos (name, shape, type, offset of
the data) and then the tensors' data, each at its offset. The table must precede the data, but
nothing in it depends on the weights' values: the tensor list and shapes come from the config
(the architecture is instantiated on the meta device), each tensor's type from the file type's
mixture (``quant.gguf_mix``), and so its size and offset. So ``GGUFExport`` writes header,
metadata and table with gguf's ``GGUFWriter`` when it is made, then writes each tensor's bytes
at its own offset the moment the tensor arrives, in whatever order the tensors come. Memory
holds one tensor at a time and the file is written once: no temporary file per tensor, no
second copy of the model on disk. Everything goes to ``<name>.partial-<pid>``, renamed to the
final name by ``finish`` once every tensor is in; leaving the ``with`` block on an exception
deletes it.

What the file holds, under llama.cpp's key and tensor names (those of ``convert_hf_to_gguf.py``):

- ``general.architecture`` (mistral is written as ``llama``, as llama.cpp does), ``general.name``,
  ``general.file_type``, ``general.quantization_version``;
- ``{arch}.context_length``, ``embedding_length``, ``block_count``, ``feed_forward_length``,
  ``attention.head_count(_kv)``, ``attention.key_length``/``value_length``,
  ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``, ``rope.dimension_count``,
  ``vocab_size``; linear and YaRN rope scaling as ``rope.scaling.*``, Llama 3's as the
  ``rope_freqs.weight`` factors;
- the tokenizer: ``tokenizer.ggml.model = gpt2`` (byte-level BPE), ``pre`` (the pre-tokenizer,
  recognised from the tokenizer's own: gpt-2, smollm, llama-bpe or qwen2), ``tokens``,
  ``token_type`` (control for special added tokens, user-defined for the other added ones,
  unused for ids past the tokenizer's vocabulary), ``merges``, the bos/eos/unknown/padding ids,
  ``add_bos_token``/``add_eos_token`` as the tokenizer behaves, and ``tokenizer.chat_template``;
- the tensors: ``token_embd``, ``blk.N.attn_q`` ... ``ffn_down``, norms (F32), ``output`` unless
  the embeddings are tied (llama.cpp then reuses ``token_embd``). For the llama architecture the
  rows of attn_q and attn_k are permuted from transformers' rotary layout (rotate_half: the two
  halves of each head) to llama.cpp's interleaved one, as ``LlamaModel.permute`` does.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    RopeScalingType,
    TokenType,
)
from torch import Tensor

from qlora_kit.errors import UserInputError
from qlora_kit.model.sources import head_dim
from qlora_kit.quant.gguf import quantize, quantized_nbytes
from qlora_kit.quant.gguf_mix import FILE_TYPES, tensor_type

log = logging.getLogger(__name__)

# transformers model_type -> llama.cpp architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Architectures whose rotary embedding llama.cpp applies to interleaved pairs (the others use NEOX's halves).
_PERMUTED_QK = {"llama"}

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_MODULES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")

# Pre-tokenizer split patterns llama.cpp knows by name (tokenizer.ggml.pre).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFExportError(UserInputError):
    """A model, tokenizer, tensor or output path that cannot go into a GGUF file; the message says why."""


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a transformers tensor name of the Llama family, or None."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _LAYER_NAME.fullmatch(hf_name)
    if match and match.group(2) in _LAYER_MODULES:
        return f"blk.{match.group(1)}.{_LAYER_MODULES[match.group(2)]}.{match.group(3)}"
    return None


def permute_qk(weight: Tensor, n_head: int) -> Tensor:
    """transformers' rotary layout -> llama.cpp's, per head (rows of a q/k weight or bias)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def unpermute_qk(weight: Tensor, n_head: int) -> Tensor:
    """llama.cpp's rotary layout -> transformers' (the inverse of :func:`permute_qk`)."""
    return (
        weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def read_gguf_state(path: str | Path, config: Any) -> dict[str, Tensor]:
    """The model tensors of a file :class:`GGUFExport` wrote, dequantized by gguf's own reader (float32),
    under transformers' names and in its rotary layout: what a stock transformers model of ``config`` loads."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    skeleton = copy.deepcopy(config)
    if hasattr(skeleton, "quantization_config"):
        del skeleton.quantization_config  # the file holds full-precision or GGML tensors
    with torch.device("meta"):
        names = list(AutoModelForCausalLM.from_config(skeleton).state_dict())
    hf_names = {gguf_tensor_name(n): n for n in names}
    n_head = config.num_attention_heads
    heads = {".attn_q.": n_head, ".attn_k.": getattr(config, "num_key_value_heads", None) or n_head}
    state = {}
    for t in GGUFReader(path).tensors:
        if t.name not in hf_names:
            continue  # generated tensors (rope_freqs): not parameters of the transformers model
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        values = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).copy())
        values = values.reshape(shape)
        if ARCHITECTURES[config.model_type] in _PERMUTED_QK:
            for part, n in heads.items():
                if part in t.name:
                    values = unpermute_qk(values, n)
        state[hf_names[t.name]] = values
    return state


def _sort_key(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order: global tensors, then layer by layer, by name within each."""
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


@dataclass
class _Slot:
    name: str
    hf_name: str | None
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    nbytes: int
    permute_heads: int | None = None
    offset: int = 0
    written: bool = False


class GGUFExport:
    """Writes one GGUF file for ``gguf_type`` (a key of ``quant.gguf_mix.FILE_TYPES``); use it as a context manager.

    ``add`` takes transformers-named tensors as they come (a layer at a time, any order); ``finish``
    checks that every tensor came and publishes the file. ``imatrix=True`` declares that ``add``
    will get importance weights (llama.cpp's type mixture differs slightly then). ``tokenizer_pre``
    overrides the detected ``tokenizer.ggml.pre``.
    """

    def __init__(
        self,
        path: str | Path,
        config: Any,
        tokenizer: Any,
        gguf_type: str,
        *,
        name: str | None = None,
        tokenizer_pre: str | None = None,
        imatrix: bool = False,
        overwrite: bool = False,
    ) -> None:
        if gguf_type not in FILE_TYPES:
            raise GGUFExportError(f"unknown --gguf-type {gguf_type!r}; expected one of {sorted(FILE_TYPES)}")
        self.path = Path(path)
        if self.path.is_dir():
            raise GGUFExportError(f"{self.path} is a directory; name the .gguf file to write")
        if self.path.exists() and not overwrite:
            raise GGUFExportError(f"{self.path} already exists; pass --overwrite to replace it")
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise GGUFExportError(
                f"GGUF export supports the model types {sorted(ARCHITECTURES)}; this model is {model_type!r}"
            )
        self.config = config
        self.gguf_type = gguf_type
        self.arch = ARCHITECTURES[model_type]
        self.imatrix = imatrix
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.partial = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)

        slots, generated = self._plan()
        writer = GGUFWriter(self.partial, self.arch)
        self._add_model_metadata(writer, name or Path(str(getattr(config, "_name_or_path", "") or model_type)).name)
        _add_tokenizer(writer, tokenizer, config, tokenizer_pre)
        offset = 0
        for slot in slots:
            slot.offset = offset
            offset += GGUFWriter.ggml_pad(slot.nbytes, writer.data_alignment)
            writer.add_tensor_info(slot.name, slot.shape, np.dtype(np.float32), slot.nbytes, raw_dtype=slot.qtype)
        self._size = offset
        self._slots = {slot.name: slot for slot in slots}
        self._by_hf = {slot.hf_name: slot for slot in slots if slot.hf_name is not None}
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            writer.close()
            self._data_start = GGUFWriter.ggml_pad(self.partial.stat().st_size, writer.data_alignment)
            self._file = open(self.partial, "r+b")  # held open until finish or abort
            for gguf_name, values in generated.items():
                self._write(self._slots[gguf_name], quantize(values, self._slots[gguf_name].qtype))
        except BaseException:
            writer.close()
            if hasattr(self, "_file"):
                self._file.close()
            self.partial.unlink(missing_ok=True)
            raise

    def __enter__(self) -> GGUFExport:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    # ---------------------------------------------------------------- layout and metadata

    def _plan(self) -> tuple[list[_Slot], dict[str, Tensor]]:
        """Every tensor of the file, from the architecture on the meta device, and the generated ones."""
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(self.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # a quantized base: the export takes full-precision tensors
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        if self.tied:
            shapes.pop("lm_head.weight", None)
        n_layer = config.num_hidden_layers
        n_head = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_head
        # llama.cpp's LLM_TYPE_70B (80 layers; for llama, with grouped-query attention) bumps attn_v.
        is_70b = n_layer == 80 and (self.arch == "qwen2" or (self.arch == "llama" and n_kv != n_head))
        slots = []
        for hf_name, shape in shapes.items():
            name = gguf_tensor_name(hf_name)
            if name is None:
                raise GGUFExportError(f"tensor {hf_name} of this {config.model_type} model has no GGUF name")
            qtype = tensor_type(self.gguf_type, name, shape, n_layer, self.tied, is_70b, self.imatrix)
            heads = None
            if self.arch in _PERMUTED_QK and ".attn_q." in name:
                heads = n_head
            elif self.arch in _PERMUTED_QK and ".attn_k." in name:
                heads = n_kv
            slots.append(_Slot(name, hf_name, shape, qtype, quantized_nbytes(shape, qtype), heads))
        generated = {}
        rope_freqs = self._llama3_rope_factors()
        if rope_freqs is not None:
            generated["rope_freqs.weight"] = rope_freqs
            shape = tuple(rope_freqs.shape)
            slots.append(_Slot("rope_freqs.weight", None, shape, GGMLQuantizationType.F32, rope_freqs.numel() * 4))
        slots.sort(key=lambda s: _sort_key(s.name))
        return slots, generated

    def _rope(self) -> dict[str, Any]:
        params = dict(getattr(self.config, "rope_parameters", None) or getattr(self.config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(self.config, "rope_theta", 10000.0))
        params.setdefault("rope_type", params.get("type", "default"))
        return params

    def _llama3_rope_factors(self) -> Tensor | None:
        """Llama 3.1's rope scaling as llama.cpp's per-frequency divisors (convert_hf_to_gguf's rope_freqs)."""
        rope = self._rope()
        if rope["rope_type"] != "llama3":
            return None
        dim = head_dim(self.config)
        freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor = rope.get("factor", 8.0)
        low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old_context = rope.get("original_max_position_embeddings", 8192)
        factors = []
        for freq in freqs.tolist():
            wavelen = 2 * math.pi / freq
            if wavelen < old_context / high:
                factors.append(1.0)
            elif wavelen > old_context / low:
                factors.append(factor)
            else:
                smooth = (old_context / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return torch.tensor(factors, dtype=torch.float32)

    def _add_model_metadata(self, w: GGUFWriter, name: str) -> None:
        c = self.config
        w.add_type("model")
        w.add_name(name)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        w.add_key_length(head_dim(self.config))
        w.add_value_length(head_dim(self.config))
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(head_dim(self.config))
        rope = self._rope()
        w.add_rope_freq_base(float(rope["rope_theta"]))
        if rope["rope_type"] == "linear":
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        elif rope["rope_type"] == "yarn":
            w.add_rope_scaling_type(RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rope["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        elif rope["rope_type"] not in ("default", "llama3"):
            raise GGUFExportError(
                f"rope scaling of type {rope['rope_type']!r} (config rope_parameters) cannot be written to GGUF; "
                "supported: default, linear, yarn, llama3"
            )
        w.add_file_type(FILE_TYPES[self.gguf_type].ftype)
        w.add_quantization_version(GGML_QUANT_VERSION)

    # ---------------------------------------------------------------- tensors

    def add(self, tensors: Mapping[str, Tensor], importance: Mapping[str, Tensor] | None = None) -> None:
        """Quantize and write tensors given under transformers' names (``model.layers.3.mlp.up_proj.weight``).

        ``importance`` maps some of those names to per-input-column weights (mean x² of the
        layer's input over the calibration tokens), llama.cpp's imatrix.
        """
        importance = dict(importance or {})
        if importance and not self.imatrix:
            raise ValueError("importance weights given to add(); create the GGUFExport with imatrix=True")
        for hf_name in importance:
            if hf_name not in tensors:
                raise ValueError(f"importance for {hf_name}, which is not among the tensors of this add()")
        for hf_name, value in tensors.items():
            slot = self._by_hf.get(hf_name)
            if slot is None:
                if hf_name == "lm_head.weight" and self.tied:
                    continue  # tied: llama.cpp reads the output projection from token_embd
                raise GGUFExportError(f"tensor {hf_name} is not part of this {self.config.model_type} model")
            if slot.written:
                raise GGUFExportError(f"tensor {hf_name} added twice")
            if tuple(value.shape) != slot.shape:
                raise GGUFExportError(f"tensor {hf_name} has shape {tuple(value.shape)}; the config says {slot.shape}")
            data = value.detach().float()
            if not torch.isfinite(data).all():
                raise GGUFExportError(f"tensor {hf_name} holds inf or nan values")
            if slot.qtype == GGMLQuantizationType.F16 and data.abs().max() > torch.finfo(torch.float16).max:
                raise GGUFExportError(f"tensor {hf_name} (max |x| = {data.abs().max().item():.4g}) overflows F16")
            if slot.permute_heads is not None:
                data = permute_qk(data, slot.permute_heads)
            qw = importance.get(hf_name)
            if qw is not None:
                qw = self._check_importance(hf_name, qw, slot)
            self._write(slot, quantize(data, slot.qtype, qw))

    @staticmethod
    def _check_importance(hf_name: str, qw: Tensor, slot: _Slot) -> Tensor:
        if tuple(qw.shape) != (slot.shape[-1],):
            raise GGUFExportError(
                f"importance of {hf_name} has shape {tuple(qw.shape)}; expected ({slot.shape[-1]},), one per input column"
            )
        qw = qw.detach().float()
        if not torch.isfinite(qw).all() or (qw < 0).any():
            raise GGUFExportError(f"importance of {hf_name} must be finite and non-negative")
        return qw

    def _write(self, slot: _Slot, data: Tensor) -> None:
        raw = data.cpu().numpy()
        assert raw.nbytes == slot.nbytes, (slot.name, raw.nbytes, slot.nbytes)
        self._file.seek(self._data_start + slot.offset)
        self._file.write(raw.data)
        slot.written = True

    def finish(self) -> Path:
        """Check that every tensor was added, then rename the partial file to ``path``."""
        missing = [s.hf_name for s in self._slots.values() if not s.written]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise GGUFExportError(f"GGUF export finished without tensors {', '.join(missing[:5])}{more}")
        self._file.truncate(self._data_start + self._size)
        self._file.close()
        os.replace(self.partial, self.path)
        counts: dict[str, int] = {}
        for slot in self._slots.values():
            counts[slot.qtype.name] = counts.get(slot.qtype.name, 0) + 1
        log.info("wrote %s (%s: %s)", self.path, self.gguf_type, ", ".join(f"{n} {t}" for t, n in counts.items()))
        return self.path

    def abort(self) -> None:
        """Delete the partial file."""
        self._file.close()
        self.partial.unlink(missing_ok=True)


# -------------------------------------------------------------------- tokenizer


def _pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, if it is one llama.cpp has."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's ``does_token_look_special`` for the tokens of our families."""
    return token.startswith("<|") and token.endswith("|>")


def _add_tokenizer(w: GGUFWriter, tokenizer: Any, config: Any, pre: str | None) -> None:
    """The vocabulary, merges, special ids and chat template, as convert_hf_to_gguf's ``_set_vocab_gpt2``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tokenizer_json = json.loads(backend.to_str()) if backend is not None else {}
    model = tokenizer_json.get("model", {})
    decoder = tokenizer_json.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            f"the tokenizer ({type(tokenizer).__name__}, model {model.get('type')!r}) is not a byte-level BPE; "
            "GGUF export writes byte-level BPE vocabularies ('gpt2': Llama 3, Qwen, SmolLM) only"
        )
    vocab_size = config.vocab_size
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(
            f"the tokenizer has token id {max(vocab.values())}, past the model's vocab_size {vocab_size}"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        token = by_id[i]
        tokens.append(token)
        if i in added:
            types.append(TokenType.CONTROL if added[i].special or _looks_special(token) else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    w.add_tokenizer_model("gpt2")
    pre = pre or _pre_tokenizer(tokenizer_json)
    if pre is None:
        log.warning("the tokenizer's pre-tokenizer is not one llama.cpp names; llama.cpp will use its default")
    else:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    def first(value: Any) -> int | None:
        return value[0] if isinstance(value, (list, tuple)) else value

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else first(getattr(config, "bos_token_id", None))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else first(getattr(config, "eos_token_id", None))
    if eos is None:
        raise GGUFExportError(
            "the tokenizer has no eos token and the config no eos_token_id: generation could not stop"
        )
    if bos is not None:
        w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if tokenizer.unk_token_id is not None:
        w.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        w.add_pad_token_id(tokenizer.pad_token_id)
    ids = tokenizer("a")["input_ids"]
    w.add_add_bos_token(bos is not None and ids[0] == bos)
    w.add_add_eos_token(ids[-1] == eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        w.add_chat_template(template)
    else:
        log.warning("the tokenizer has no chat template; llama.cpp's chat completion will fall back to its own")
