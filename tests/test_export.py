"""Exported GPTQ v1 / AWQ gemm / bf16 checkpoints, read back by a reader written from docs/formats.md.

The quantized weights come from the real driver (merge + GPTQ / AWQ on a tiny random
Llama); the reader below uses numpy bit operations only, not qlora_kit.quant.packing.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from qlora_kit.model.adapters import add_lora, lora_modules, peft_config, read_adapter, save_adapter
from qlora_kit.model.load import load_quantized
from qlora_kit.model.sources import load_config, resolve_source
from qlora_kit.pipelines.base_weights import NF4Weights
from qlora_kit.pipelines.export import (
    CheckpointWriter,
    ExportError,
    awq_quantization_config,
    gptq_quantization_config,
    marlin_problems,
)
from qlora_kit.pipelines.layerwise import merged_model
from qlora_kit.pipelines.quantize import QuantSpec
from qlora_kit.quant.intq import IntQuantWeight

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def nibbles(words: np.ndarray) -> np.ndarray:
    """int32 [..., m] -> [..., m, 8]: nibble i = bits 4i..4i+3 of the unsigned 32-bit word."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    return (u[..., None] >> (4 * np.arange(8))) & 0xF


def read_gptq_v1(t: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """docs/formats.md: qweight [K/8, N], input channel 8*row+j in bits 4j..; qzeros [G, N/8] packed along N,
    storing zero - 1; scales [G, N]. Returns q [N, K], zero [N, G], scale [N, G], g_idx [K]."""
    qweight, qzeros = t["qweight"].numpy(), t["qzeros"].numpy()
    k8, n = qweight.shape
    q = nibbles(qweight).transpose(0, 2, 1).reshape(k8 * 8, n).T  # [row, col, j] -> input channel 8*row+j
    zero = nibbles(qzeros).reshape(qzeros.shape[0], n).T + 1
    return q, zero, t["scales"].float().numpy().T, t["g_idx"].numpy()


def read_awq_gemm(t: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """docs/formats.md: qweight [K, N/8], nibble i of word c holds output column 8c + order[i]; raw zeros."""

    def unpack(words):
        nib = nibbles(words)  # [rows, c, i]
        out = np.empty_like(nib)
        out[..., AWQ_ORDER] = nib
        return out.reshape(words.shape[0], -1)

    return unpack(t["qweight"].numpy()).T, unpack(t["qzeros"].numpy()).T, t["scales"].float().numpy().T


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama (hidden 128, vocab 300, untied lm_head) and a LoRA adapter on every linear."""
    root = tmp_path_factory.mktemp("tiny-export")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=300,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(root / "base")
    model = load_quantized(str(root / "base"), device="cpu", compute_dtype="float32", progress=False)
    add_lora(model, r=4, alpha=8)
    for m in lora_modules(model).values():
        m.lora_B.weight.data.normal_(0, 0.05)
    save_adapter(model, root / "adapter", peft_config(model, 4, 8, 0.0, False, str(root / "base")))
    source = resolve_source(str(root / "base"))
    nf4 = load_quantized(source, device="cpu", compute_dtype="float32", progress=False)
    return {"nf4": nf4, "config": load_config(source), "adapter": read_adapter(root / "adapter")}


def quantized_parts(tiny, spec):
    """Run the driver: the tensors of the merged, quantized model, exactly as they are exported."""
    base = NF4Weights(tiny["nf4"], torch.device("cpu"))
    ids = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(1))
    return list(
        merged_model(
            tiny["config"], base, tiny["adapter"], spec, ids, torch.device("cpu"), torch.float32, progress=False
        )
    )


def export(tiny, parts, out, fmt, qc, max_shard_bytes=2**30):
    with CheckpointWriter(out, fmt, max_shard_bytes=max_shard_bytes) as writer:
        for part in parts:
            writer.add(part)
        writer.finish(tiny["config"], quantization_config=qc)


SPECS = {
    "gptq-sym": (QuantSpec("gptq", group_size=32, symmetric=True), "gptq"),
    "gptq-asym-act-order": (QuantSpec("gptq", group_size=64, symmetric=False, act_order=True), "gptq"),
    "awq": (QuantSpec("awq", group_size=32, symmetric=False), "awq"),
}


@pytest.mark.parametrize("case", list(SPECS))
def test_independent_reader_recovers_what_we_quantized(tmp_path, tiny, case):
    spec, fmt = SPECS[case]
    parts = quantized_parts(tiny, spec)
    qc = (
        gptq_quantization_config(4, spec.group_size, spec.symmetric, spec.act_order, 0.01)
        if fmt == "gptq"
        else awq_quantization_config(4, spec.group_size)
    )
    export(tiny, parts, tmp_path / "out", fmt, qc, max_shard_bytes=100_000)  # several shards
    files = read_checkpoint(tmp_path / "out")
    ours = {name: v for part in parts for name, v in part.items()}
    quantized = {name: v for name, v in ours.items() if isinstance(v, IntQuantWeight)}
    assert len(quantized) == 2 * len(LINEARS)
    for name, w in quantized.items():
        prefix = name.removesuffix(".weight")
        t = {
            key: files[f"{prefix}.{key}"]
            for key in ("qweight", "qzeros", "scales", "g_idx")
            if f"{prefix}.{key}" in files
        }
        if fmt == "gptq":
            q, zero, scale, g_idx = read_gptq_v1(t)
            assert np.array_equal(g_idx, w.g_idx.numpy()), name
        else:
            q, zero, scale = read_awq_gemm(t)
        assert np.array_equal(q, w.q.numpy()), name
        assert np.array_equal(zero, w.zero.numpy()), name
        # as_stored rounded the scales to fp16 already: the file holds them exactly.
        assert np.array_equal(scale, w.scale.numpy()), name
        if fmt == "gptq" and spec.symmetric:
            assert (t["qzeros"] == 0x77777777).all()
    # Non-quantized tensors are the driver's, in fp16 (AWQ: the norms with the scales folded in).
    for name, v in ours.items():
        if not isinstance(v, IntQuantWeight):
            assert torch.equal(files[name], v.half()), name
    if fmt == "awq":
        norm = "model.layers.0.input_layernorm.weight"
        assert not torch.equal(files[norm], tiny["nf4"].get_submodule(norm.removesuffix(".weight")).weight.half())


def packed_layout(fmt: str, n: int, k: int, group_size: int) -> dict:
    """docs/formats.md's tables: tensor -> (shape, dtype) for a Linear [N, K]."""
    g = k // group_size
    if fmt == "gptq":
        return {
            "qweight": ((k // 8, n), torch.int32),
            "qzeros": ((g, n // 8), torch.int32),
            "scales": ((g, n), torch.float16),
            "g_idx": ((k,), torch.int32),
        }
    return {
        "qweight": ((k, n // 8), torch.int32),
        "qzeros": ((g, n // 8), torch.int32),
        "scales": ((g, n), torch.float16),
    }


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_names_shapes_and_dtypes_are_what_loaders_expect(tmp_path, tiny, fmt):
    spec = QuantSpec(fmt, group_size=32, symmetric=fmt == "gptq")
    qc = gptq_quantization_config(4, 32, True, False, 0.01) if fmt == "gptq" else awq_quantization_config(4, 32)
    export(tiny, quantized_parts(tiny, spec), tmp_path / "out", fmt, qc)
    out = tmp_path / "out"
    files = read_checkpoint(out)

    # Every stock parameter name, each linear's .weight replaced by its packed tensors (docs/formats.md).
    config = tiny["config"]
    stock = LlamaForCausalLM(config).state_dict()
    expected = {}
    for name, p in stock.items():
        prefix, _, _ = name.rpartition(".")
        if prefix.split(".layers.")[-1].split(".", 1)[-1] in LINEARS:
            n, k = p.shape
            expected.update({f"{prefix}.{key}": layout for key, layout in packed_layout(fmt, n, k, 32).items()})
        else:
            expected[name] = (tuple(p.shape), torch.float16)  # embeddings, norms, lm_head
    assert {name: (tuple(t.shape), t.dtype) for name, t in files.items()} == expected

    written = json.loads((out / "config.json").read_text())
    assert written["quantization_config"] == qc
    assert written["dtype"] == "float16"
    if fmt == "gptq":
        assert qc == {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": 32,
            "desc_act": False,
            "sym": True,
            "damp_percent": 0.01,
            "true_sequential": True,
            "checkpoint_format": "gptq",
            "static_groups": False,
        }
        assert json.loads((out / "quantize_config.json").read_text()) == qc
    else:
        assert qc == {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 32,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
        assert not (out / "quantize_config.json").exists()


def test_bf16_checkpoint_in_shards_loads_in_transformers(tmp_path, tiny):
    parts = quantized_parts(tiny, None)
    export(tiny, parts, tmp_path / "out", "bf16", None, max_shard_bytes=200_000)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ours = {name: v for part in parts for name, v in part.items()}
    state = model.state_dict()
    assert set(state) == set(ours)
    for name, v in ours.items():
        assert torch.equal(state[name], v.to(torch.bfloat16)), name


def test_partial_directory_and_overwrite(tmp_path, tiny):
    parts = quantized_parts(tiny, None)
    out = tmp_path / "out"
    # Interrupted while writing: neither the output nor the partial directory is left.
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(out, "bf16", max_shard_bytes=1) as writer:
            writer.add(parts[0])
            assert (tmp_path / f"out.partial-{os.getpid()}" / "model-00001.safetensors").is_file()
            assert not out.exists()
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []

    export(tiny, parts, out, "bf16", None)
    assert (out / "config.json").is_file() and list(tmp_path.iterdir()) == [out]
    with pytest.raises(ExportError, match=r"already holds a model \(config.json\); pass --overwrite"):
        CheckpointWriter(out, "bf16")
    (out / "stale.txt").write_text("from an earlier run")
    with CheckpointWriter(out, "bf16", overwrite=True) as writer:
        for part in parts:
            writer.add(part)
        assert (out / "stale.txt").exists()  # the old model stays until the new one is complete
        writer.finish(tiny["config"])
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fp16_overflow_is_reported_with_the_tensor_name(tmp_path):
    with CheckpointWriter(tmp_path / "out", "gptq") as writer:
        with pytest.raises(ExportError, match=r"model.norm.weight .*overflows torch.float16"):
            writer.add({"model.norm.weight": torch.tensor([1.0, 1e6])})


def test_marlin_problems_name_the_layer_and_the_reason():
    smol = {f"model.layers.{i}.self_attn.q_proj": (576, 576) for i in range(3)}
    smol["model.layers.0.mlp.gate_proj"] = (1536, 576)
    problems = marlin_problems(smol, 64, symmetric=True)
    assert len(problems) == 2  # one line per module name and shape, not per layer
    assert problems[0].startswith("model.layers.0.self_attn.q_proj [N=576, K=576]")
    assert "in_features divisible by 128 (K=576)" in problems[0]
    assert marlin_problems({"model.layers.0.self_attn.q_proj": (4096, 4096)}, 128, symmetric=True) == []
    assert "symmetric" in marlin_problems({"model.layers.0.self_attn.q_proj": (4096, 4096)}, 128, symmetric=False)[0]
