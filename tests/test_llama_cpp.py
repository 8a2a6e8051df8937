"""Our GGUF files in llama.cpp itself, through llama-cpp-python.

Skipped where llama-cpp-python is not installed: it builds llama.cpp from source (minutes), so CI
does not install it (``pip install -e .[gguf]`` does). References: transformers' GGUF reader for the
logits, llama.cpp's own quantizer (``llama_model_quantize``) for the type mixture and the K-quants,
and transformers' chat template for the prompt llama.cpp builds.
"""

import ctypes
import importlib.util

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from test_merge import tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from qlora_kit.cli import main
from qlora_kit.model.sources import load_tokenizer, resolve_source
from qlora_kit.pipelines.export_gguf import GGUFExport

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed (pip install -e .[gguf])"
)
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def llama_cpp():
    import llama_cpp

    return llama_cpp


@pytest.fixture(scope="module")
def tokenizer():
    """A 300-token byte-level BPE with a ChatML template: small models, quick K-quant searches."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(resolve_source("smollm2"))


def small_model(tokenizer, tied=True) -> LlamaForCausalLM:
    """A random 2-layer Llama whose rows the K-quants take (hidden 256)."""
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def export(path, model, tokenizer, gguf_type):
    with GGUFExport(path, model.config, tokenizer, gguf_type) as writer:
        writer.add(model.state_dict())
        return writer.finish()


def llama(path, **kwargs):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=256, n_batch=256, verbose=False, **kwargs)


@pytest.mark.parametrize("gguf_type,tol", [("f16", 5e-3), ("q8_0", 2e-2), ("q4_0", 5e-2), ("q4_k_m", 5e-2)])
def test_llama_cpp_computes_the_logits_transformers_reads_from_the_file(tokenizer, tmp_path, gguf_type, tol):
    path = export(tmp_path / f"m-{gguf_type}.gguf", small_model(tokenizer), tokenizer, gguf_type)
    ids = tokenizer("The river town lived by the water, and the mill turned all day.")["input_ids"]
    llm = llama(path, logits_all=True)
    llm.eval(ids)
    ours = torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float64))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].double()
    # llama.cpp rounds the activations too (f16, or Q8 blocks for the quantized dot products)
    assert ((ours - expected).norm() / expected.norm()).item() < tol


def quantize_with_llama_cpp(llama_cpp, source, target, gguf_type):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0
    return target


@pytest.mark.parametrize("gguf_type", ["q4_0", "q5_1", "q4_k_m", "q4_k_s", "q5_k_m", "q6_k"])
def test_our_quantizer_against_llama_cpps_on_the_same_f16_weights(llama_cpp, tokenizer, tmp_path, gguf_type):
    """llama.cpp's quantizer of our f16 file vs ours of the same (f16-rounded) weights: the same type for
    every tensor (the mixture), and per tensor an RMSE against the f16 weights no larger than llama.cpp's."""
    model = small_model(tokenizer, tied=False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    f16 = export(tmp_path / "f16.gguf", model, tokenizer, "f16")
    theirs = quantize_with_llama_cpp(llama_cpp, f16, tmp_path / "theirs.gguf", gguf_type)
    ours = export(tmp_path / "ours.gguf", model, tokenizer, gguf_type)
    read = {name: {t.name: t for t in gguf.GGUFReader(p).tensors} for name, p in (("f16", f16), ("t", theirs))}
    ours_tensors = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert {n: t.tensor_type for n, t in ours_tensors.items()} == {n: t.tensor_type for n, t in read["t"].items()}
    quantized = [n for n, t in ours_tensors.items() if t.tensor_type not in (T.F32, T.F16)]
    assert {ours_tensors[n].tensor_type for n in quantized} >= {
        "q4_0": {T.Q4_0},
        "q5_1": {T.Q5_1},
        "q4_k_m": {T.Q4_K, T.Q6_K},
        "q4_k_s": {T.Q4_K, T.Q5_K, T.Q6_K},
        "q5_k_m": {T.Q5_K, T.Q6_K},
        "q6_k": {T.Q6_K},
    }[gguf_type]
    for name in quantized:
        weight = np.asarray(read["f16"][name].data, dtype=np.float64)
        ours_t, theirs_t = ours_tensors[name], read["t"][name]
        rmse = [np.sqrt(np.mean((dequantize(t.data, t.tensor_type) - weight) ** 2)) for t in (ours_t, theirs_t)]
        assert rmse[0] <= rmse[1] * (1 + 1e-9), (name, rmse)
        # in fact the same bytes: ours is llama.cpp's quantizer, K-quant searches included
        np.testing.assert_array_equal(np.asarray(ours_t.data), np.asarray(theirs_t.data), err_msg=name)


def eos_model(tokenizer) -> LlamaForCausalLM:
    """A model whose every next token is EOS: the layers add nothing (o_proj and down_proj zero), every
    embedding has a large channel 0, and only the output row of EOS reads it."""
    model = small_model(tokenizer, tied=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 50.0
    return model


def test_chat_completion_applies_the_template_and_stops_at_eos(smollm2_tokenizer, tmp_path):
    """SmolLM2's own tokenizer and template (a default system prompt when there is none)."""
    tokenizer = smollm2_tokenizer
    path = export(tmp_path / "eos.gguf", eos_model(tokenizer), tokenizer, "q8_0")
    llm = llama(path)
    for messages in (
        [{"role": "user", "content": "Say nothing."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say nothing."}],
    ):
        result = llm.create_chat_completion(messages, max_tokens=16, temperature=0.0)
        assert result["choices"][0]["finish_reason"] == "stop" and result["choices"][0]["message"]["content"] == ""
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert result["usage"]["prompt_tokens"] == len(prompt)
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == prompt
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template


def test_cli_chat_with_a_gguf_file_is_llama_cpps_answer(tokenizer, tmp_path, capsys):
    path = export(tmp_path / "m.gguf", small_model(tokenizer), tokenizer, "q8_0")
    messages = [{"role": "user", "content": "What is the date?"}]
    expected = llama(path).create_chat_completion(messages, max_tokens=8, temperature=0.0)
    expected = expected["choices"][0]["message"]["content"]
    code = main(["chat", str(path), "--prompt", "What is the date?", "--temperature", "0", "--max-new-tokens", "8"])
    assert code == 0 and expected and capsys.readouterr().out == expected + "\n"
