"""The streaming NF4 loader against the stock transformers model it replaces."""

import json
import weakref

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qlora_kit.model import load as load_mod
from qlora_kit.model.load import empty_model, load_quantized, materialize, nf4_bytes
from qlora_kit.model.sources import ModelSourceError, iter_safetensors, resolve_source
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.quant.nf4 import dequantize_nf4_reference, quantize_nf4

TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False)).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, max_shard_size="100KB")  # many shards
    return path, model


def test_each_decoder_linear_is_nf4_of_the_checkpoint(llama_dir):
    path, ref = llama_dir
    assert len(list(path.glob("*.safetensors"))) > 3
    model = load_quantized(str(path), device="cpu", compute_dtype="float32", progress=False)
    ref_params = dict(ref.named_parameters())
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(nf4) == 7 * TINY["num_hidden_layers"]
    for name, m in nf4.items():
        expected = quantize_nf4(ref_params[f"{name}.weight"].detach())
        assert torch.equal(m.weight_packed, expected.packed) and torch.equal(m.weight_absmax_q, expected.absmax_q)
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.input_layernorm.weight",
    ):
        assert torch.equal(dict(model.named_parameters())[name], ref_params[name])
    assert not any(p.requires_grad for p in model.parameters())


def test_logits_match_stock_model_with_dequantized_weights(llama_dir):
    """Our NF4 model computes what a stock transformers model with the dequantized weights computes."""
    path, ref = llama_dir
    model = load_quantized(str(path), device="cpu", compute_dtype="float32", progress=False)
    stock = LlamaForCausalLM(ref.config).eval()
    stock.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, NF4Linear):
                stock.get_submodule(name).weight.copy_(dequantize_nf4_reference(m.nf4_weight))
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        ours, theirs = model(ids).logits, stock(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_streams_one_tensor_at_a_time(llama_dir):
    """Full-precision checkpoint tensors are released as soon as they are quantized."""
    path, _ = llama_dir
    alive, peak = set(), [0]

    def tracked():
        for name, tensor in iter_safetensors(path):
            key = id(tensor)
            alive.add(key)
            weakref.finalize(tensor, alive.discard, key)
            peak[0] = max(peak[0], len(alive))
            yield name, tensor

    config = load_mod.load_config(resolve_source(str(path)))
    model = empty_model(config, torch.float32)
    materialize(model, tracked(), torch.device("cpu"), torch.float32, progress=False)
    assert peak[0] <= 2
    assert nf4_bytes(model) < 0.14 * sum(
        m.in_features * m.out_features * 4 for m in model.modules() if isinstance(m, NF4Linear)
    )


def test_qwen2_family_loads(tmp_path):
    model = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    model.save_pretrained(tmp_path)
    ours = load_quantized(str(tmp_path), device="cpu", compute_dtype="float32", progress=False)
    q = ours.model.layers[0].self_attn.q_proj
    assert isinstance(q, NF4Linear) and q.bias is not None  # Qwen2 has q/k/v biases
    assert torch.equal(q.bias, model.model.layers[0].self_attn.q_proj.bias)


def test_missing_path():
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_quantized("/no/such/model", device="cpu")


def test_unsupported_model_type(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="model type 'gpt2' is not supported"):
        load_quantized(str(tmp_path), device="cpu")


def test_truncated_shard(llama_dir, tmp_path):
    path, _ = llama_dir
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(ModelSourceError, match=victim.name):
        load_quantized(str(tmp_path), device="cpu", progress=False)


def test_missing_shard_and_missing_tensor(llama_dir, tmp_path):
    path, _ = llama_dir
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / shard).unlink()
    with pytest.raises(ModelSourceError, match="missing"):
        load_quantized(str(tmp_path), device="cpu", progress=False)
    # Drop the shard from the index too: now tensors are missing from the checkpoint.
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match="missing .* tensors"):
        load_quantized(str(tmp_path), device="cpu", progress=False)


def test_shape_mismatch(llama_dir, tmp_path):
    path, _ = llama_dir
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 192
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelSourceError, match=r"down_proj.weight' has shape \(128, 256\), the model expects \(128, 192\)"
    ):
        load_quantized(str(tmp_path), device="cpu", progress=False)
