"""GGUF export: our torch quantizers against the gguf package, llama.cpp's type mixture, and whole
files read back by gguf's reader and by transformers' GGUF loader."""

import random

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import TokenType

from qlora_kit.pipelines.export_gguf import GGUFExport, GGUFExportError, permute_qk
from qlora_kit.quant.gguf import quantize
from qlora_kit.quant.gguf_mix import tensor_type, use_more_bits

LEGACY = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
WEIGHTED = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, *K_QUANTS]


def _weights(rows: int = 64, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with the awkward blocks: all zeros, ±max ties, negative max, one sign, constant."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, :256] = 0
    w[1, :32] = torch.tensor([0.05, -0.05] * 16)  # |max| tie: the first one decides the sign of d
    w[2, :32] = -torch.rand(32, generator=g) * 0.03  # negative max
    w[3, :64] = torch.rand(64, generator=g) * 0.03  # all positive: min > 0
    w[4, :32] = 0.0125  # constant block
    w[5, 256:] = torch.randint(-3, 4, (256,), generator=g).float() * 0.01  # values on a grid: rounding ties
    w[6] *= 40  # a large row
    return w


def _dequant(data: torch.Tensor, qtype: T) -> np.ndarray:
    return gguf.quants.dequantize(data.numpy(), qtype).astype(np.float64)


# ---------------------------------------------------------------------------- quantizers


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_legacy_types_are_bit_exact_with_gguf(qtype):
    w = _weights()
    ours = quantize(w, qtype).numpy()
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, gguf.quants.quantize(w.numpy(), qtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_input_dtype_only_changes_the_values(dtype):
    w = _weights().to(dtype)
    np.testing.assert_array_equal(quantize(w, T.Q4_1).numpy(), gguf.quants.quantize(w.float().numpy(), T.Q4_1))


def _block_steps(x: np.ndarray, qtype: T) -> np.ndarray:
    """The rounding step of each weight's block on the plain round-to-nearest grid of its format."""
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        n = 16 if qtype == T.Q6_K else 32
    else:
        n = 32
    b = x.reshape(-1, n)
    amax, lo = np.abs(b).max(1), np.minimum(b.min(1), 0 if qtype in (T.Q4_K, T.Q5_K) else b.min(1))
    step = {
        T.Q8_0: amax / 127,
        T.Q4_0: amax / 8,
        T.Q5_0: amax / 16,
        T.Q4_1: (b.max(1) - lo) / 15,
        T.Q5_1: (b.max(1) - lo) / 31,
        T.Q4_K: (b.max(1) - lo) / 15,
        T.Q5_K: (b.max(1) - lo) / 31,
        T.Q6_K: amax / 32,
    }[qtype]
    return np.repeat(step, n)


@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS, ids=lambda t: t.name)
def test_round_trip_through_gguf_dequantize(qtype):
    """gguf's own reader decodes our bytes to within the error of rounding on each block's grid:
    RMSE at most step/sqrt(12) (uniform rounding error), the searched K-quants included."""
    w = _weights(seed=1)
    x = w.double().numpy().ravel()
    data = quantize(w, qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert data.shape == (w.shape[0], w.shape[1] // block * type_size)
    err = _dequant(data, qtype).ravel() - x
    bound = np.sqrt(np.mean(_block_steps(x, qtype) ** 2) / 12)
    assert np.sqrt(np.mean(err**2)) <= 1.05 * bound
    assert np.all(err[:256] == 0)  # the all-zero blocks stay exactly zero


@pytest.mark.parametrize("qtype,dtype", [(T.F32, torch.float32), (T.F16, torch.float16), (T.BF16, torch.bfloat16)])
def test_float_types_are_the_plain_casts(qtype, dtype):
    w = _weights()
    data = quantize(w, qtype)
    np.testing.assert_array_equal(data.numpy(), w.to(dtype).view(torch.uint8).numpy())
    if qtype != T.BF16:
        np.testing.assert_array_equal(_dequant(data, qtype), w.to(dtype).double().numpy())


def _rtn_reference(x: np.ndarray, qtype: T) -> np.ndarray:
    """Round to nearest on the K-quant's sub-block structure, in float64 with exact (unstored) scales."""
    if qtype == T.Q6_K:
        b = x.reshape(-1, 16)
        d = b[np.arange(len(b)), np.abs(b).argmax(1)][:, None] / -32
        d[d == 0] = 1
        return (np.clip(np.round(b / d), -32, 31) * d).reshape(x.shape)
    nmax = 15 if qtype == T.Q4_K else 31
    b = x.reshape(-1, 32)
    lo, hi = np.minimum(b.min(1, keepdims=True), 0), b.max(1, keepdims=True)
    s = (hi - lo) / nmax
    s[s == 0] = 1
    return (np.clip(np.round((b - lo) / s), 0, nmax) * s + lo).reshape(x.shape)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("heavy_tails", [False, True])
def test_k_quant_search_beats_round_to_nearest(qtype, heavy_tails):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(128, 1024, generator=g) * 0.02
    if heavy_tails:
        w = w / torch.rand(128, 1024, generator=g).clamp(min=0.05).sqrt()
    x = w.double().numpy()
    ours = np.sqrt(np.mean((_dequant(quantize(w, qtype), qtype) - x) ** 2))
    assert ours < np.sqrt(np.mean((_rtn_reference(x, qtype) - x) ** 2))
    affine = {T.Q4_K: T.Q4_1, T.Q5_K: T.Q5_1}.get(qtype)
    if affine is not None:  # and gguf's own quantizer of the same width, with a scale and min per 32
        theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), affine), affine)
        assert ours < np.sqrt(np.mean((theirs - x) ** 2))


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
def test_importance_lowers_the_weighted_error(qtype):
    w = _weights(seed=3)
    importance = torch.from_numpy(np.random.default_rng(3).lognormal(0.0, 2.0, w.shape[1])).float()
    x = w.double().numpy()

    def weighted_error(data):
        return float((((_dequant(data, qtype) - x) ** 2) * importance.double().numpy()).sum())

    plain, weighted = quantize(w, qtype), quantize(w, qtype, importance)
    assert weighted_error(weighted) < 0.8 * weighted_error(plain)
    # uniform importance is a different (llama.cpp imatrix) path, but still a good quantization
    uniform = quantize(w, qtype, torch.ones(w.shape[1]))
    assert np.sqrt(np.mean((_dequant(uniform, qtype) - x) ** 2)) < 1.1 * np.sqrt(
        np.mean((_dequant(plain, qtype) - x) ** 2)
    )


def test_q8_0_ignores_importance():
    w = _weights()
    assert torch.equal(quantize(w, T.Q8_0, torch.rand(w.shape[1])), quantize(w, T.Q8_0))


def test_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(torch.randn(4, 576), T.Q4_K)
    with pytest.raises(ValueError, match="one per column"):
        quantize(torch.randn(4, 256), T.Q4_K, torch.ones(128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS, ids=lambda t: t.name)
def test_gpu_gives_the_cpu_bytes(qtype):
    w = _weights(seed=4)
    importance = torch.rand(w.shape[1]) + 0.1
    for qw in (None, importance):
        cpu = quantize(w, qtype, qw)
        gpu = quantize(w.cuda(), qtype, None if qw is None else qw.cuda())
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


# ---------------------------------------------------------------------------- type mixture


def test_use_more_bits_on_30_layers():
    # the first and last eighth (n/8 = 3, 7n/8 = 26), and every third layer from 3 + 2
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_mixture_of_a_30_layer_smollm2_shape():
    """SmolLM2-135M: 30 layers, hidden 576 (not a multiple of 256), ffn 1536, tied embeddings."""
    more = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}

    def types(ft, name, shape):
        return [tensor_type(ft, name.format(i), shape, 30, tied_embeddings=True) for i in range(30)]

    # q4_k_m: attn_v [192, 576] wants Q6_K where use_more_bits, else Q4_K; 576 falls back to Q8_0 / Q5_0
    assert types("q4_k_m", "blk.{}.attn_v.weight", (192, 576)) == [T.Q8_0 if i in more else T.Q5_0 for i in range(30)]
    # ffn_down [576, 1536] keeps its K-quants
    assert types("q4_k_m", "blk.{}.ffn_down.weight", (576, 1536)) == [
        T.Q6_K if i in more else T.Q4_K for i in range(30)
    ]
    assert types("q5_k_m", "blk.{}.ffn_down.weight", (576, 1536)) == [
        T.Q6_K if i in more else T.Q5_K for i in range(30)
    ]
    assert types("q4_k_m", "blk.{}.ffn_up.weight", (1536, 576)) == [T.Q5_0] * 30
    assert types("q5_k_m", "blk.{}.attn_q.weight", (576, 576)) == [T.Q5_1] * 30
    # q4_k_s: attn_v of layers 0-3 and ffn_down of the first 30 // 8 = 3 layers get Q5_K
    assert types("q4_k_s", "blk.{}.attn_v.weight", (192, 576)) == [T.Q5_1] * 4 + [T.Q5_0] * 26
    assert types("q4_k_s", "blk.{}.ffn_down.weight", (576, 1536)) == [T.Q5_K] * 3 + [T.Q4_K] * 27
    assert types("q5_k_s", "blk.{}.ffn_down.weight", (576, 1536)) == [T.Q5_K] * 30
    assert types("q6_k", "blk.{}.ffn_gate.weight", (1536, 576)) == [T.Q8_0] * 30
    # the tied embedding is the output projection: Q6_K, or Q8_0 for 576-wide rows
    for ft in ("q4_0", "q4_k_m", "q5_k_s", "q6_k", "q8_0"):
        assert tensor_type(ft, "token_embd.weight", (49152, 576), 30, tied_embeddings=True) == T.Q8_0
    for ft, default in (("f16", T.F16), ("bf16", T.BF16)):
        assert types(ft, "blk.{}.attn_v.weight", (192, 576)) == [default] * 30
    assert tensor_type("q4_k_m", "blk.0.attn_norm.weight", (576,), 30, True) == T.F32
    assert tensor_type("q4_k_m", "blk.0.attn_q.bias", (576,), 30, True) == T.F32


def test_mixture_of_a_llama_8b_shape():
    """32 layers, hidden 4096: no fallbacks; an untied embedding keeps the default type."""
    assert tensor_type("q4_k_m", "output.weight", (128256, 4096), 32, False) == T.Q6_K
    assert tensor_type("q4_k_m", "token_embd.weight", (128256, 4096), 32, False) == T.Q4_K
    assert tensor_type("q4_0", "output.weight", (128256, 4096), 32, False) == T.Q6_K
    assert tensor_type("q8_0", "output.weight", (128256, 4096), 32, False) == T.Q8_0
    v = [tensor_type("q4_k_m", f"blk.{i}.attn_v.weight", (1024, 4096), 32, False) for i in range(32)]
    assert v == [T.Q6_K if use_more_bits(i, 32) else T.Q4_K for i in range(32)]
    # llama.cpp's 70B (80 layers): attn_v Q4_K -> Q5_K
    v70 = [tensor_type("q4_k_m", f"blk.{i}.attn_v.weight", (1024, 8192), 80, False, is_70b=True) for i in range(80)]
    assert v70 == [T.Q6_K if use_more_bits(i, 80) else T.Q5_K for i in range(80)]
    # an imatrix Q4_0 guards the first n/8 ffn_down layers with Q4_1
    down = [tensor_type("q4_0", f"blk.{i}.ffn_down.weight", (4096, 14336), 32, False, imatrix=True) for i in range(8)]
    assert down == [T.Q4_1] * 4 + [T.Q4_0] * 4


def test_mixture_matches_the_embedded_llama_cpp_file():
    """The embedded SmolLM2 GGUF was written by llama.cpp's quantizer as Q4_1: our rules give its types."""
    from qlora_kit.model.sources import embedded_default_path

    reader = gguf.GGUFReader(embedded_default_path())
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    n_layer = reader.fields["llama.block_count"].contents()
    tied = all(t.name != "output.weight" for t in reader.tensors)
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        assert tensor_type("q4_1", t.name, shape, n_layer, tied) == t.tensor_type, t.name


# ---------------------------------------------------------------------------- whole files


def _read(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _export(path, model, tokenizer, gguf_type, order=None, **kwargs):
    """Export ``model`` a layer at a time (``order``: a permutation of the layer groups)."""
    state = model.state_dict()
    groups = {}
    for name, t in state.items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "global"
        groups.setdefault(key, {})[name] = t
    keys = list(groups) if order is None else order(list(groups))
    with GGUFExport(path, model.config, tokenizer, gguf_type, **kwargs) as export:
        for key in keys:
            export.add(groups[key])
        return export.finish()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("gguf_type,tol", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_export_loads_in_transformers_with_close_logits(tiny, tmp_path, gguf_type, tol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = tiny
    path = _export(tmp_path / f"tiny-{gguf_type}.gguf", model, tokenizer, gguf_type)
    assert path.is_file() and not list(tmp_path.glob("*.partial-*"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref, got = _logits(model, ids), _logits(loaded, ids)
    assert (got - ref).abs().max() <= tol * ref.abs().max()

    # the tokenizer transformers rebuilds from the file tokenizes a chat exactly like the original
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    chat = [{"role": "user", "content": "Convert 5 March 2021, s'il vous plaît! <|im_end|>"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_export_metadata_and_tokenizer(tiny, tmp_path):
    model, tokenizer = tiny
    config = model.config
    reader, tensors = _read(_export(tmp_path / "tiny.gguf", model, tokenizer, "q8_0"))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_hidden_layers,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.rope.dimension_count": config.hidden_size // config.num_attention_heads,
        "llama.vocab_size": config.vocab_size,
    }
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)

    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    assert eos == tokenizer.eos_token_id and tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert not _field(reader, "tokenizer.ggml.add_bos_token")
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    vocab = tokenizer.get_vocab()
    assert len(tokens) == config.vocab_size and all(vocab[t] == i for i, t in enumerate(tokens))
    assert types[eos] == TokenType.CONTROL and types[vocab["Ġthe"]] == TokenType.NORMAL
    assert len(_field(reader, "tokenizer.ggml.merges")) > 40000

    # tied: no output.weight; every tensor in the file is one of the model's
    assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type == T.Q8_0
    assert len(tensors) == len([n for n in model.state_dict() if n != "lm_head.weight"])


# Llama 3's pre-tokenizer split, as its tokenizer.json spells it
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@pytest.fixture(scope="module")
def small_tokenizer():
    """A Llama-3-style byte-level BPE of 512 tokens, trained here, so the models below stay small."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["The quick brown fox jumps over the lazy dog 1234 times.", "Convert the 5th of March, 2021 to ISO."]
    backend.train_from_iterator(corpus * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|begin_of_text|>{{ m['role'] }}: {{ m['content'] }}<|eot_id|>{% endfor %}"
    )
    return tokenizer


def _k_model(tokenizer, layers=3, tied=False, model_type="llama", **extra):
    """A small random model of the family whose rows K-quants can take (hidden 256, ffn 512)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_k_quant_file_holds_our_bytes_in_llama_cpp_layout(small_tokenizer, tmp_path):
    """Each tensor's data is our quantizer's output of the model's tensor (q/k rows in llama.cpp's
    order), under the mixture's type, and dequantizes back to the model's tensor."""
    model = _k_model(small_tokenizer)
    reader, tensors = _read(_export(tmp_path / "k.gguf", model, small_tokenizer, "q4_k_m"))
    assert _field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    n_layer = model.config.num_hidden_layers
    state = model.state_dict()
    assert tensors["output.weight"].tensor_type == T.Q6_K and tensors["token_embd.weight"].tensor_type == T.Q4_K
    downs = [tensors[f"blk.{i}.ffn_down.weight"].tensor_type for i in range(n_layer)]
    assert downs == [T.Q6_K if use_more_bits(i, n_layer) else T.Q4_K for i in range(n_layer)]
    for hf_name, gguf_name, heads in (
        ("model.embed_tokens.weight", "token_embd.weight", None),
        ("lm_head.weight", "output.weight", None),
        ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", None),
        ("model.layers.2.self_attn.v_proj.weight", "blk.2.attn_v.weight", None),
        ("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight", 8),
        ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", 2),
    ):
        ref, t = state[hf_name], tensors[gguf_name]
        assert t.tensor_type == tensor_type("q4_k_m", gguf_name, tuple(ref.shape), n_layer, False)
        stored = ref if heads is None else permute_qk(ref, heads)
        np.testing.assert_array_equal(np.asarray(t.data), quantize(stored, t.tensor_type).numpy())
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        if heads is not None:  # undo llama.cpp's permutation as transformers' loader does
            back = back.reshape(heads, ref.shape[0] // heads // 2, 2, -1).swapaxes(2, 1).reshape(ref.shape)
        assert np.sqrt(np.mean((back - ref.numpy()) ** 2)) < 0.1 * ref.std().item()


def test_k_quant_export_loads_in_transformers(small_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = small_tokenizer
    model = _k_model(tokenizer, tied=True)
    path = _export(tmp_path / "k.gguf", model, tokenizer, "q5_k_m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    ref, got = _logits(model, ids), _logits(loaded, ids)
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Jump over 2021 dogs, it's 12345!"}], tokenize=False
    )
    assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_exports_unpermuted_with_biases_and_qk_norms(small_tokenizer, tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    tokenizer = small_tokenizer
    # transformers' GGUF loader takes Qwen3's head_dim from its config default (128), not from the file
    extra = {"head_dim": 128} if model_type == "qwen3" else {}
    model = _k_model(tokenizer, layers=2, tied=True, model_type=model_type, **extra)
    with torch.no_grad():  # give the biases and norms values a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = _export(tmp_path / f"{model_type}.gguf", model, tokenizer, "f16")
    reader, tensors = _read(path)
    assert _field(reader, "general.architecture") == model_type
    extra = {"qwen2": "blk.0.attn_q.bias", "qwen3": "blk.0.attn_q_norm.weight"}[model_type]
    assert tensors[extra].tensor_type == T.F32
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    ref, got = _logits(model, ids), _logits(loaded, ids)
    assert (got - ref).abs().max() <= 2e-3 * ref.abs().max()


def test_importance_goes_to_the_weighted_quantizer(small_tokenizer, tmp_path):
    tokenizer = small_tokenizer
    model = _k_model(tokenizer, layers=1, tied=True)
    state = model.state_dict()
    name = "model.layers.0.self_attn.v_proj.weight"
    importance = torch.rand(state[name].shape[1]) + 0.1
    with GGUFExport(tmp_path / "imatrix.gguf", model.config, tokenizer, "q4_k_s", imatrix=True) as export:
        with pytest.raises(GGUFExportError, match="importance of .*v_proj.* one per input column"):
            export.add({name: state[name]}, importance={name: importance[:10]})
        export.add(state, importance={name: importance})
        path = export.finish()
    _, tensors = _read(path)
    t = tensors["blk.0.attn_v.weight"]
    assert t.tensor_type == T.Q5_K  # q4_k_s: attn_v of layers 0-3
    np.testing.assert_array_equal(np.asarray(t.data), quantize(state[name], T.Q5_K, importance).numpy())


def test_llama3_rope_factors_match_transformers(small_tokenizer, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    tokenizer = small_tokenizer
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    }
    model = _k_model(tokenizer, layers=1, tied=True, rope_parameters=rope)
    _, tensors = _read(_export(tmp_path / "rope.gguf", model, tokenizer, "f16"))
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    # llama.cpp divides each default frequency by its factor; transformers computes the scaled ones
    head_dim = model.config.head_dim
    default = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    np.testing.assert_allclose(default / factors, scaled.numpy(), rtol=1e-5)


def test_export_errors_name_the_problem(tiny, tmp_path):
    from transformers import GPT2Config

    model, tokenizer = tiny
    state = model.state_dict()
    with pytest.raises(GGUFExportError, match="unknown --gguf-type 'q3_k'"):
        GGUFExport(tmp_path / "x.gguf", model.config, tokenizer, "q3_k")
    with pytest.raises(GGUFExportError, match="this model is 'gpt2'"):
        GGUFExport(tmp_path / "x.gguf", GPT2Config(), tokenizer, "f16")
    (tmp_path / "exists.gguf").write_bytes(b"")
    with pytest.raises(GGUFExportError, match="exists.gguf already exists"):
        GGUFExport(tmp_path / "exists.gguf", model.config, tokenizer, "f16")

    with GGUFExport(tmp_path / "x.gguf", model.config, tokenizer, "f16") as export:
        with pytest.raises(GGUFExportError, match=r"model.norm.weight has shape \(3,\)"):
            export.add({"model.norm.weight": torch.ones(3)})
        with pytest.raises(GGUFExportError, match="model.layers.7.mlp.up_proj.weight is not part"):
            export.add({"model.layers.7.mlp.up_proj.weight": torch.ones(3)})
        with pytest.raises(GGUFExportError, match="model.norm.weight holds inf or nan"):
            export.add({"model.norm.weight": torch.full_like(state["model.norm.weight"], float("nan"))})
        export.add({"model.norm.weight": state["model.norm.weight"]})
        with pytest.raises(GGUFExportError, match="model.norm.weight added twice"):
            export.add({"model.norm.weight": state["model.norm.weight"]})
        with pytest.raises(GGUFExportError, match="without tensors model.embed_tokens.weight"):
            export.finish()
        partial = export.partial
        assert partial.exists()
    export.abort()
    assert not partial.exists() and not (tmp_path / "x.gguf").exists()

    with pytest.raises(RuntimeError, match="interrupted"):
        with GGUFExport(tmp_path / "y.gguf", model.config, tokenizer, "f16") as export:
            export.add({"model.norm.weight": state["model.norm.weight"]})
            raise RuntimeError("interrupted")
    assert not list(tmp_path.glob("y.gguf*"))


def test_tensors_in_any_order_give_the_same_file(tiny, tmp_path):
    """Tensors may come in any order (the file is laid out up front): byte for byte the same file."""
    model, tokenizer = tiny
    items = list(model.state_dict().items())
    random.Random(0).shuffle(items)
    with GGUFExport(tmp_path / "shuffled.gguf", model.config, tokenizer, "q8_0") as export:
        for name, t in items:
            export.add({name: t})
        shuffled = export.finish()
    assert shuffled.read_bytes() == _export(tmp_path / "ordered.gguf", model, tokenizer, "q8_0").read_bytes()
