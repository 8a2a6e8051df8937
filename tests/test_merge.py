"""Merge + re-quantize on a tiny random Llama, against independent references.

References: PEFT's merge_and_unload on a stock transformers model (holding the NF4
reference dequantization for merge-into-nf4), a float64 stock model for GPTQ's layer inputs, and
packing.unpack_* of the written files for what the report evaluated.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import qlora_kit.pipelines.quantize as quantize_module
from qlora_kit.cli import main
from qlora_kit.config import load_recipe, save_recipe
from qlora_kit.data import DataCollator
from qlora_kit.model.adapters import (
    ADAPTER_WEIGHTS,
    AdapterError,
    add_lora,
    lora_modules,
    peft_config,
    read_adapter,
    save_adapter,
)
from qlora_kit.model.load import load_quantized
from qlora_kit.model.plans import layer_plan
from qlora_kit.model.sources import load_config, resolve_source
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.pipelines.base_weights import NF4Weights
from qlora_kit.pipelines.calibration import CalibrationError, calibration_windows
from qlora_kit.pipelines.evaluate import (
    cut_note,
    exact_match_accuracy,
    format_report,
    load_test_examples,
    logit_agreement,
    perplexity,
    response_loss,
)
from qlora_kit.pipelines.export import ExportError
from qlora_kit.pipelines.layerwise import merged_model
from qlora_kit.pipelines.merge import MergeError, MergeOptions, merge
from qlora_kit.pipelines.quantize import QuantSpec, as_stored
from qlora_kit.quant.intq import IntQuantWeight, rtn_quantize
from qlora_kit.quant.nf4 import dequantize_nf4_reference
from qlora_kit.quant.packing import pack_gptq_v1, unpack_awq_gemm, unpack_gptq_v1

ROOT = Path(__file__).resolve().parent.parent
ESSAYS = (ROOT / "examples/heldout/essays.txt").read_text()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 300-token byte-level BPE trained on the held-out essays, with a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([ESSAYS], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_base(path: Path, tokenizer, kv_heads: int = 4, hidden: int = 128) -> Path:
    """A 2-layer random Llama; a few hidden channels get 8x larger norm weights, the activation
    outliers of real LLMs that AWQ exists to protect."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] = 8.0
            layer.post_attention_layernorm.weight[5:9] = 8.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def adapter_run(root: Path, **base_shape) -> dict:
    """In ``root``: a :func:`tiny_base` of ``base_shape``, chat data and a trained-looking adapter directory
    (random LoRA weights, the tokenizer, recipe.yaml). Returns root, base, adapter, tokenizer and eval_text."""
    tokenizer = tiny_tokenizer()
    base = tiny_base(root / "base", tokenizer, **base_shape)
    sentences = [s.strip() for s in ESSAYS.split(".") if len(s.strip()) > 40]
    rows = [
        {"messages": [{"role": "user", "content": s[:40]}, {"role": "assistant", "content": s[40:]}]} for s in sentences
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (root / "heldout.txt").write_text(ESSAYS[:2500])

    model = load_quantized(str(base), device="cpu", compute_dtype="float32", progress=False)
    add_lora(model, r=4, alpha=8)
    torch.manual_seed(1)
    for m in lora_modules(model).values():
        m.lora_B.weight.data.normal_(0, 0.05)
    adapter = root / "adapter"
    save_adapter(model, adapter, peft_config(model, 4, 8, 0.0, False, str(base)))
    tokenizer.save_pretrained(adapter)
    (root / "recipe.yaml").write_text(
        f"model: {{name_or_path: '{base}'}}\n"
        f"data: {{train: '{root}/train.jsonl', validation: '{root}/test.jsonl', test: '{root}/test.jsonl'}}\n"
        "eval: {max_new_tokens: 4}\n"
    )
    save_recipe(load_recipe(root / "recipe.yaml"), adapter / "recipe.yaml")
    return {"root": root, "base": base, "adapter": adapter, "tokenizer": tokenizer, "eval_text": root / "heldout.txt"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Base model, chat data and a trained-looking adapter directory (adapter, tokenizer, recipe.yaml)."""
    return adapter_run(tmp_path_factory.mktemp("merge"))


def options(run, out, **kw):
    kw = {
        "quantize": "none",
        "group_size": 32,
        "calibration_samples": 4,
        "calibration_seq_len": 64,
        "eval_text": str(run["eval_text"]),
        "evaluate": False,
        "progress": False,
        **kw,
    }
    return MergeOptions(str(run["adapter"]), str(out), **kw)


def peft_merged(run, nf4: bool) -> dict[str, torch.Tensor]:
    """PEFT's merge of our adapter into a stock model; with ``nf4`` the decoder linears first hold
    the NF4 weights training saw (the loader's NF4 model, dequantized by the reference code)."""
    from peft import PeftModel

    stock = LlamaForCausalLM.from_pretrained(run["base"], dtype=torch.float32)
    if nf4:
        quantized = load_quantized(str(run["base"]), device="cpu", compute_dtype="float32", progress=False)
        with torch.no_grad():
            for name, m in quantized.named_modules():
                if isinstance(m, NF4Linear):
                    stock.get_submodule(name).weight.copy_(dequantize_nf4_reference(m.nf4_weight, torch.float32))
    return PeftModel.from_pretrained(stock, run["adapter"]).merge_and_unload().state_dict()


@pytest.mark.parametrize("merge_into", ["nf4", "original"])
def test_merged_checkpoint_equals_peft_merge(tmp_path, run, merge_into):
    out = tmp_path / "merged"
    merge(options(run, out, merge_into=merge_into))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors", "report.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    ours = AutoModelForCausalLM.from_pretrained(out).state_dict()
    reference = peft_merged(run, nf4=merge_into == "nf4")
    other = peft_merged(run, nf4=merge_into != "nf4")
    assert set(ours) == set(reference)
    for name, t in ours.items():
        assert t.dtype == torch.bfloat16
        # bf16(W + s*B@A): equal, or one bf16 step apart where the fp32 sums differ in the last bit.
        torch.testing.assert_close(t.float(), reference[name].to(torch.bfloat16).float(), rtol=2**-7, atol=1e-7)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(ours[q].float(), other[q], rtol=2**-7, atol=1e-7)  # the option matters


class RecordingGPTQ(quantize_module.GPTQ):
    """GPTQ that keeps every calibration input it is given."""

    created: list = []

    def __init__(self, columns, device=None):
        super().__init__(columns, device)
        self.inputs = []
        RecordingGPTQ.created.append(self)

    def add_batch(self, inp):
        self.inputs.append(inp.clone())
        super().add_batch(inp)


def test_gptq_inputs_are_true_sequential(run, monkeypatch):
    """Each group's Hessian inputs equal a float64 stock model's, with every earlier group
    (earlier layers and earlier groups of the same layer) holding its quantized weights."""
    monkeypatch.setattr(quantize_module, "GPTQ", RecordingGPTQ)
    RecordingGPTQ.created = []
    source = resolve_source(str(run["base"]))
    config = load_config(source)
    nf4 = load_quantized(source, device="cpu", compute_dtype="float32", progress=False)
    adapter = read_adapter(run["adapter"])
    ids = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")

    def stream(spec):
        parts = merged_model(config, NF4Weights(nf4, cpu), adapter, spec, ids, cpu, torch.float32, progress=False)
        return {name: v for part in parts for name, v in part.items()}

    merged = stream(None)
    quantized = stream(QuantSpec("gptq", group_size=32, act_order=True))
    sequence = layer_plan(config.model_type).gptq_sequence
    assert len(RecordingGPTQ.created) == 2 * len(sequence)

    reference = float64_model(config, merged)
    recorded = iter(RecordingGPTQ.created)
    for i in range(config.num_hidden_layers):
        for group in sequence:
            first = f"model.layers.{i}.{group[0]}"
            ours = torch.cat(next(recorded).inputs).double()
            torch.testing.assert_close(ours, module_input(reference, first, ids), rtol=1e-4, atol=1e-5)
            if first == "model.layers.0.self_attn.o_proj":
                # Inputs through unquantized q/k/v differ far beyond the tolerance: the check can fail.
                unquantized = module_input(float64_model(config, merged), first, ids)
                assert (unquantized - ours).abs().max() > 100 * 1e-5
            with torch.no_grad():  # later groups see this one quantized
                for name in group:
                    key = f"model.layers.{i}.{name}.weight"
                    reference.get_submodule(key.removesuffix(".weight")).weight.copy_(quantized[key].dequantize())


def float64_model(config, state: dict) -> torch.nn.Module:
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    model.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
    model.tie_weights()
    return model


def module_input(model: torch.nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen[0]


def stock_from(parts: dict, config) -> torch.nn.Module:
    state = {k: (v.dequantize() if isinstance(v, IntQuantWeight) else v) for k, v in parts.items()}
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def test_gptq_and_awq_beat_rtn_and_awq_folds_exactly(run):
    source = resolve_source(str(run["base"]))
    config = load_config(source)
    nf4 = load_quantized(source, device="cpu", compute_dtype="float32", progress=False)
    adapter = read_adapter(run["adapter"])
    ids = calibration_windows(run["tokenizer"], run["root"] / "train.jsonl", 8, 64)
    eval_ids = torch.tensor(run["tokenizer"](ESSAYS[-3000:])["input_ids"])
    cpu = torch.device("cpu")

    def build(spec):
        parts = merged_model(config, NF4Weights(nf4, cpu), adapter, spec, ids, cpu, torch.float32, progress=False)
        return {name: v for part in parts for name, v in part.items()}

    merged = build(None)
    reference = stock_from(merged, config)

    def error(spec):
        parts = build(spec)
        return logit_agreement(stock_from(parts, config), reference, eval_ids, seq_len=512)["relative_l2"], parts

    rtn_sym, _ = error(QuantSpec("rtn", group_size=32, symmetric=True))
    gptq, _ = error(QuantSpec("gptq", group_size=32, symmetric=True))
    rtn_asym, _ = error(QuantSpec("rtn", group_size=32, symmetric=False))
    awq, _ = error(QuantSpec("awq", group_size=32, symmetric=False))
    assert gptq < 0.8 * rtn_sym, (gptq, rtn_sym)
    assert awq < 0.9 * rtn_asym, (awq, rtn_asym)

    # At 8 bits AWQ is as close to the merged model as plain RTN: folding 1/s into the norms
    # (which now differ) and s into the weights kept the function. A wrong fold is off by O(1).
    awq8, parts = error(QuantSpec("awq", bits=8, group_size=32, symmetric=False))
    rtn8, _ = error(QuantSpec("rtn", bits=8, group_size=32, symmetric=False))
    norm = "model.layers.0.input_layernorm.weight"
    assert (parts[norm] - merged[norm]).abs().max() > 0.1
    assert awq8 < 2 * rtn8, (awq8, rtn8)


def test_awq_skips_v_to_o_under_grouped_query_attention(tmp_path, run):
    """With 4 query heads on 2 KV heads, v_proj's output is narrower than o_proj's input."""
    base = tiny_base(tmp_path / "gqa", run["tokenizer"], kv_heads=2)
    source = resolve_source(str(base))
    config = load_config(source)
    nf4 = load_quantized(source, device="cpu", compute_dtype="float32", progress=False)
    cpu = torch.device("cpu")
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    plain = {
        k: v
        for part in merged_model(config, NF4Weights(nf4, cpu), None, None, None, cpu, torch.float32, False)
        for k, v in part.items()
    }
    parts = {
        k: v
        for part in merged_model(
            config,
            NF4Weights(nf4, cpu),
            None,
            QuantSpec("awq", group_size=32, symmetric=False),
            ids,
            cpu,
            torch.float32,
            False,
        )
        for k, v in part.items()
    }
    v = "model.layers.0.self_attn.v_proj.weight"
    assert parts[v].q.shape == plain[v].shape == (64, 128)
    # v was scaled only along its input columns (the q/k/v group), never along its output rows.
    assert stock_from(parts, config)(ids).logits.isfinite().all()


def test_report_rows_and_exported_files_agree(tmp_path, run):
    """--report builds every model; the GPTQ/AWQ files, read back with packing.unpack_*, are the evaluated weights."""
    out = tmp_path / "gptq"
    report = merge(options(run, out, quantize="gptq", report=True, evaluate=True))
    assert json.loads((out / "report.json").read_text()) == report
    rows = {r["model"]: r for r in report["results"]}
    assert list(rows) == ["NF4 + adapter", "merged bf16", "RTN (sym)", "GPTQ (sym)", "RTN (asym)", "AWQ (asym)"]
    assert all("perplexity" in r and "val_loss" in r and "exact_match" in r for r in rows.values())
    assert report["test_examples"] == 3
    assert report["calibration"] == {
        "source": str(run["root"] / "train.jsonl"),
        "samples": 4,
        "seq_len": 64,
        "tokens": 256,
    }
    # NF4 + adapter (LoRA applied on the fly) and the merged bf16 model differ by bf16 rounding only.
    assert rows["merged bf16"]["perplexity"] == pytest.approx(rows["NF4 + adapter"]["perplexity"], rel=1e-2)
    assert rows["merged bf16"]["val_loss"] == pytest.approx(rows["NF4 + adapter"]["val_loss"], rel=1e-2)

    eval_ids = torch.tensor(run["tokenizer"](run["eval_text"].read_text())["input_ids"])
    config = load_config(resolve_source(str(run["base"])))

    def model_of_files(directory: Path, fmt: str) -> LlamaForCausalLM:
        from safetensors.torch import load_file

        files = load_file(str(directory / "model.safetensors"))
        state = {}
        for name, t in files.items():
            prefix, _, key = name.rpartition(".")
            if key == "qweight":
                packed = {
                    k: files[f"{prefix}.{k}"]
                    for k in ("qweight", "qzeros", "scales", "g_idx")
                    if f"{prefix}.{k}" in files
                }
                w = unpack_gptq_v1(packed, 32) if fmt == "gptq" else unpack_awq_gemm(packed, 32)
                state[f"{prefix}.weight"] = w.dequantize()
            elif key not in ("qzeros", "scales", "g_idx"):
                state[name] = t.float()
        model = LlamaForCausalLM(config).eval()
        assert not model.load_state_dict(state, strict=False).unexpected_keys
        model.tie_weights()
        return model

    def perplexity_of_files(directory: Path, fmt: str) -> float:
        return perplexity(model_of_files(directory, fmt), eval_ids)

    gptq_model = model_of_files(out, "gptq")
    assert perplexity(gptq_model, eval_ids) == rows["GPTQ (sym)"]["perplexity"]

    # Exact match of the exported model: the report, its generations file and its printed table
    # against exact_match_accuracy on the stock model read back from the files.
    examples = load_test_examples(load_recipe(run["adapter"] / "recipe.yaml"), None)
    reference = exact_match_accuracy(gptq_model, run["tokenizer"], examples, 4)
    assert reference.cut > 0  # the recipe's budget of 4 tokens is shorter than the answers
    assert (report["max_new_tokens"], report["match"], report["exported"]) == (4, "exact", "GPTQ (sym)")
    assert (rows["GPTQ (sym)"]["exact_match"], rows["GPTQ (sym)"]["cut"]) == (reference.accuracy, reference.cut)
    generations = [json.loads(line) for line in (out / "test_generations.jsonl").read_text().splitlines()]
    assert [g["expected"] for g in generations] == [e["answer"] for e in examples]
    assert all(list(g)[2:] == list(rows) for g in generations)  # prompt, expected, then one per report row
    assert [g["GPTQ (sym)"] for g in generations] == [
        {k: r[k] for k in ("generated", "correct", "cut", "problem")} for r in reference.generations
    ]
    printed = format_report(report)
    most = max(r["cut"] for r in rows.values())
    assert f"{reference.cut}/3" in printed and cut_note(most, 3, 4) in printed
    assert f"GPTQ (sym): {reference.format_mismatches()}" in printed
    awq_out = tmp_path / "awq"
    awq_report = merge(options(run, awq_out, quantize="awq", evaluate=True))
    assert [r["model"] for r in awq_report["results"]] == ["NF4 + adapter", "AWQ (asym)"]
    assert perplexity_of_files(awq_out, "awq") == awq_report["results"][1]["perplexity"]
    assert awq_report["results"][1]["perplexity"] == rows["AWQ (asym)"]["perplexity"]


def test_gptq_v1_zero_point_0_is_moved_to_1():
    torch.manual_seed(0)
    weight = torch.rand(8, 32) + 0.5  # all positive: every asymmetric group has zero point 0
    w = rtn_quantize(weight, group_size=16, symmetric=False)
    assert (w.zero == 0).all()
    stored = as_stored(w, QuantSpec("gptq", group_size=16, symmetric=False), "layer")
    assert (stored.zero == 1).all()
    top = w.q == 15
    assert top.any()
    step = w.scale.half().float()[:, w.g_idx.long()]
    expected = w.q.float() * step - top.float() * step  # exact, except code 15 is one step lower
    assert torch.equal(stored.dequantize(), expected)
    back = unpack_gptq_v1(pack_gptq_v1(stored), 16, symmetric=False)
    assert torch.equal(back.dequantize(), stored.dequantize())
    awq = as_stored(w, QuantSpec("awq", group_size=16, symmetric=False), "layer")
    assert (awq.zero == 0).all()  # AWQ stores raw zeros


def test_calibration_windows_follow_the_text_and_chat_template(tmp_path, run):
    tok = run["tokenizer"]
    text = tmp_path / "c.txt"
    text.write_text(ESSAYS[:1500])
    ids = tok(ESSAYS[:1500])["input_ids"] + [tok.eos_token_id]
    windows = calibration_windows(tok, text, 3, 100)
    assert windows.shape == (3, 100) and windows.reshape(-1).tolist() == ids[:300]

    row = {
        "messages": [
            {"role": "user", "content": "What is the river town?"},
            {"role": "assistant", "content": "A town that lived by the river."},
        ]
    }
    chat = tmp_path / "c.jsonl"
    chat.write_text((json.dumps(row) + "\n") * 20)
    rendered = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
    windows = calibration_windows(tok, chat, 2, 50)
    assert windows.reshape(-1).tolist() == (rendered * 20)[:100]

    with pytest.raises(CalibrationError, match=rf"c.txt has {len(ids)} tokens, but 4 samples x 512 tokens need 2048"):
        calibration_windows(tok, text, 4, 512)
    with pytest.raises(CalibrationError, match="not found"):
        calibration_windows(tok, tmp_path / "missing.jsonl", 1, 8)


def test_bad_input_is_named(tmp_path, run):
    adapter = run["adapter"]
    broken = tmp_path / "no-weights"
    shutil.copytree(adapter, broken)
    (broken / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterError, match=f"no {ADAPTER_WEIGHTS} in {broken}"):
        merge(MergeOptions(str(broken), str(tmp_path / "o"), evaluate=False))
    with pytest.raises(AdapterError, match="does not exist"):
        merge(MergeOptions(str(tmp_path / "nowhere"), str(tmp_path / "o"), evaluate=False))

    other = tiny_base(tmp_path / "other", run["tokenizer"], hidden=64)
    with pytest.raises(
        AdapterError,
        match=r"'model.layers.0.mlp.down_proj' has lora_A \(4, 256\) and lora_B "
        r"\(128, 4\), but .*other has a \[64, 128\] weight there",
    ):
        merge(options(run, tmp_path / "o", base=str(other)))
    with pytest.raises(
        MergeError,
        match=r"--group-size 48 does not divide in_features K=128 of "
        r"model.layers.0.self_attn.q_proj \[N=128, K=128\]; .*\[32, 64, 128\]",
    ):
        merge(options(run, tmp_path / "o", quantize="gptq", group_size=48))
    with pytest.raises(CalibrationError, match=r"has \d+ tokens, but 10000 samples x 64 tokens need 640000"):
        merge(options(run, tmp_path / "o", quantize="awq", calibration_samples=10000))
    with pytest.raises(MergeError, match="would replace the adapter directory"):
        merge(options(run, adapter, overwrite=True))
    held = tmp_path / "held"
    held.mkdir()
    (held / "config.json").write_text("{}")
    with pytest.raises(ExportError, match=r"already holds a model \(config.json\); pass --overwrite"):
        merge(options(run, held))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held", "no-weights", "other"]  # nothing half-written


def test_interrupted_merge_leaves_no_output(tmp_path, run, monkeypatch):
    calls = []

    def interrupt_second_layer(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    real = quantize_module.LAYER_PASSES["rtn"]
    monkeypatch.setitem(quantize_module.LAYER_PASSES, "rtn", interrupt_second_layer)
    with pytest.raises(KeyboardInterrupt):
        merge(options(run, tmp_path / "out", quantize="rtn"))
    assert list(tmp_path.iterdir()) == []


def test_cli_merge_and_its_errors(tmp_path, run, capsys):
    out = tmp_path / "rtn"
    code = main(
        [
            "merge",
            str(run["adapter"]),
            "--out",
            str(out),
            "--quantize",
            "rtn",
            "--group-size",
            "64",
            "--no-sym",
            "--eval-text",
            str(run["eval_text"]),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "NF4 + adapter" in printed and "RTN (asym)" in printed and str(out) in printed
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sym"] is False
    assert main(["merge", str(run["adapter"]), "--out", str(tmp_path / "bf16"), "--no-eval"]) == 0
    printed = capsys.readouterr().out
    assert "merged bf16" in printed and "perplexity" not in printed
    code = main(
        ["merge", str(run["adapter"]), "--out", str(tmp_path / "x"), "--quantize", "gptq", "--group-size", "48"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "qlora-kit: error: --group-size 48" in err and "Traceback" not in err


def test_response_loss_is_the_mean_over_labelled_tokens(tiny_llama_config):
    """Against transformers' own loss (labels -100 ignored), on rows of different lengths."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    rows = []
    for n, prompt in ((9, 4), (6, 2), (12, 7)):
        ids = torch.randint(0, 64, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    nll = tokens = 0.0
    for r in rows:  # one row at a time: no padding involved in the reference
        labelled = sum(label != -100 for label in r["labels"][1:])
        loss = model(torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss
        nll, tokens = nll + loss.item() * labelled, tokens + labelled
    collate = DataCollator(SimpleNamespace(pad_token_id=0, eos_token_id=None))
    batches = [collate(rows[:2]), collate(rows[2:])]
    assert response_loss(model, batches) == pytest.approx(nll / tokens, rel=1e-5)
