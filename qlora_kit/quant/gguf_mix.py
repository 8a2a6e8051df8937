"""Which GGML type each tensor of a GGUF file gets: llama.cpp's ``llama_tensor_get_type``.

A file type (``q4_k_m``, ...) names a default type and a mixture: llama-quantize gives the
output projection (and the token embedding, when the two are tied) Q6_K, and the ``_m`` / ``_s``
mixtures more bits to some layers' ``attn_v`` and ``ffn_down``:

| file type | default | attn_v | ffn_down |
| --- | --- | --- | --- |
| q4_k_m | Q4_K | Q6_K where use_more_bits | Q6_K where use_more_bits |
| q5_k_m | Q5_K | Q6_K where use_more_bits | Q6_K where use_more_bits |
| q4_k_s | Q4_K | Q5_K in layers 0-3 | Q5_K in the first n_layer/8 |
| q5_k_s | Q5_K | | |

``use_more_bits(i, n)``: the first and last eighth of the layers and every third one between.
llama.cpp's 70B models (80 layers, grouped-query attention) also get Q5_K for attn_v where it
would be Q4_K. A row length the chosen type's block does not divide falls back
(Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16): SmolLM2's 576-wide rows take Q5_0 in a
q4_k_m file. Only 2-D weights are quantized; norms, biases and rope factors stay F32. Rules
for types and architectures we do not write (IQ*, Q2_K, Q3_K, Falcon, experts) are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

T = GGMLQuantizationType


@dataclass(frozen=True)
class FileType:
    """A GGUF file type: its ``general.file_type`` and the type most tensors get."""

    name: str
    ftype: LlamaFileType
    default: GGMLQuantizationType


FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("f16", LlamaFileType.MOSTLY_F16, T.F16),
        FileType("bf16", LlamaFileType.MOSTLY_BF16, T.BF16),
        FileType("q8_0", LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
        FileType("q4_0", LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
        FileType("q4_1", LlamaFileType.MOSTLY_Q4_1, T.Q4_1),
        FileType("q5_0", LlamaFileType.MOSTLY_Q5_0, T.Q5_0),
        FileType("q5_1", LlamaFileType.MOSTLY_Q5_1, T.Q5_1),
        FileType("q4_k_s", LlamaFileType.MOSTLY_Q4_K_S, T.Q4_K),
        FileType("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
        FileType("q5_k_s", LlamaFileType.MOSTLY_Q5_K_S, T.Q5_K),
        FileType("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
        FileType("q6_k", LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
    )
}

# tensor_type_fallback: what a type becomes when the row length is not a multiple of its block
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's layers that get more bits in the ``_m`` mixtures."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _mixture(ft: str, name: str, ncols: int, n_layer: int, tied: bool, is_70b: bool, imatrix: bool) -> T:
    """``llama_tensor_get_type_impl`` for our file types and the Llama family's tensors."""
    new = FILE_TYPES[ft].default
    match = _LAYER.match(name)
    layer = int(match.group(1)) if match else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if ncols % GGML_QUANT_SIZES[new][0] != 0:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if name.endswith("attn_v.weight"):
        if ft in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layer):
            new = T.Q6_K
        elif ft == "q4_k_s" and layer < 4:
            new = T.Q5_K
        if is_70b and new == T.Q4_K:
            new = T.Q5_K
    elif name.endswith("ffn_down.weight"):
        if ft in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layer):
            new = T.Q6_K
        elif ft == "q4_k_s" and layer < n_layer // 8:
            new = T.Q5_K
        elif ft in ("q4_0", "q5_0") and imatrix and layer < n_layer // 8:
            # llama.cpp guards the first ffn_down layers of an imatrix Q4_0/Q5_0 with Q4_1/Q5_1
            new = T.Q4_1 if ft == "q4_0" else T.Q5_1
    return new


def tensor_type(
    file_type: str,
    name: str,
    shape: tuple[int, ...],
    n_layer: int,
    tied_embeddings: bool,
    is_70b: bool = False,
    imatrix: bool = False,
) -> GGMLQuantizationType:
    """The GGML type of tensor ``name`` (a llama.cpp name, e.g. ``blk.3.attn_v.weight``) in a file of ``file_type``.

    ``shape`` is the torch shape (rows, cols); ``tied_embeddings``: the file has no ``output.weight``
    and the token embedding serves as the output projection; ``is_70b``: llama.cpp's LLM_TYPE_70B;
    ``imatrix``: the weights are quantized with importance weights.
    """
    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown GGUF file type {file_type!r}; expected one of {sorted(FILE_TYPES)}")
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return T.F32
    default = FILE_TYPES[file_type].default
    if default in (T.F16, T.BF16):
        return default
    new = _mixture(file_type, name, shape[-1], n_layer, tied_embeddings, is_70b, imatrix)
    if shape[-1] % GGML_QUANT_SIZES[new][0] != 0:
        new = _FALLBACK.get(new, T.F16)
        if shape[-1] % GGML_QUANT_SIZES[new][0] != 0:
            new = T.F16
    return new
