"""merge --quantize gguf on a tiny random Llama whose rows K-quants can take (hidden 256).

References: transformers' own GGUF reader (``from_pretrained(..., gguf_file=...)``) and the merged
bf16 checkpoint for the logits, a float64 stock model for the imatrix statistics, and gguf's
reader for the tensor types in the file.
"""

import json

import gguf
import pytest
import torch
from test_merge import ESSAYS, adapter_run
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import qlora_kit.pipelines.quantize as quantize_module
from qlora_kit.cli import main
from qlora_kit.model.adapters import read_adapter
from qlora_kit.model.load import load_quantized, resolve_compute_dtype
from qlora_kit.model.plans import layer_plan
from qlora_kit.model.sources import load_config, resolve_source
from qlora_kit.pipelines.base_weights import NF4Weights
from qlora_kit.pipelines.calibration import calibration_windows
from qlora_kit.pipelines.evaluate import perplexity
from qlora_kit.pipelines.layerwise import merged_model
from qlora_kit.pipelines.merge import MergeError, MergeOptions, merge
from qlora_kit.pipelines.merge_gguf import MODELFILE, GGUFSpec
from qlora_kit.pipelines.quantize import ImportanceWeighted

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A hidden-256 base, chat data, and an adapter directory with random LoRA weights and its recipe."""
    run = adapter_run(tmp_path_factory.mktemp("merge-gguf"), kv_heads=2, hidden=256)
    merged = run["root"] / "merged"
    merge(MergeOptions(str(run["adapter"]), str(merged), evaluate=False, progress=False))
    return {**run, "merged": merged}


def options(run, out, **kw):
    kw = {
        "quantize": "gguf",
        "calibration_samples": 4,
        "calibration_seq_len": 64,
        "eval_text": str(run["root"] / "heldout.txt"),
        "evaluate": False,
        "progress": False,
        **kw,
    }
    return MergeOptions(str(run["adapter"]), str(out), **kw)


def gguf_file(out, gguf_type):
    return out / f"adapter-{gguf_type}.gguf"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("gguf_type,tol", [("f16", 1e-2), ("q8_0", 3e-2), ("q4_k_m", None)])
def test_export_loads_in_transformers_close_to_the_merged_model(tmp_path, run, gguf_type, tol):
    out = tmp_path / "gguf"
    merge(options(run, out, gguf_type=gguf_type))
    path = gguf_file(out, gguf_type)
    assert sorted(p.name for p in out.iterdir()) == sorted([path.name, MODELFILE, "report.json"])
    assert not list(tmp_path.glob("*.partial-*"))
    assert (out / MODELFILE).read_text() == f"FROM ./{path.name}\n"

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    expected = {"f16": {T.F16, T.F32}, "q8_0": {T.Q8_0, T.F32}, "q4_k_m": {T.Q4_K, T.Q6_K, T.F32}}[gguf_type]
    assert set(types.values()) == expected
    if gguf_type == "q4_k_m":  # llama.cpp's mixture: Q6_K for attn_v / ffn_down of the last layer, tied output
        assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == T.Q6_K
        assert types["blk.0.ffn_down.weight"] == T.Q4_K

    reference = AutoModelForCausalLM.from_pretrained(run["merged"], dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([run["tokenizer"](ESSAYS[-600:])["input_ids"][:64]])
    ref, got = logits(reference, ids), logits(loaded, ids)
    if tol is not None:
        assert (got - ref).abs().max() <= tol * ref.abs().max()
    else:
        assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.97
        assert (got - ref).abs().max() > 1e-2 * ref.abs().max()  # 4 bits do round: the check can fail


def test_report_evaluates_the_written_file(tmp_path, run):
    out = tmp_path / "gguf"
    report = merge(options(run, out, gguf_type="q4_0", report=True, evaluate=True))
    rows = {r["model"]: r for r in report["results"]}
    assert list(rows) == ["NF4 + adapter", "merged bf16", "GGUF q4_0"]
    assert report["exported"] == "GGUF q4_0" and report["quantization"] == {"gguf_type": "q4_0", "imatrix": False}
    assert all("perplexity" in r and "val_loss" in r and "exact_match" in r for r in rows.values())
    generations = [json.loads(line) for line in (out / "test_generations.jsonl").read_text().splitlines()]
    assert all(list(g)[2:] == list(rows) for g in generations)
    # The file read by transformers' GGUF loader gives the perplexity the report measured.
    dtype = resolve_compute_dtype("auto", torch.device("cpu"))
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file(out, "q4_0").name, dtype=dtype).eval()
    eval_ids = torch.tensor(run["tokenizer"]((run["root"] / "heldout.txt").read_text())["input_ids"])
    assert perplexity(loaded, eval_ids) == pytest.approx(rows["GGUF q4_0"]["perplexity"], rel=1e-3)
    assert rows["GGUF q4_0"]["perplexity"] != pytest.approx(rows["merged bf16"]["perplexity"], rel=1e-3)


def _stream(run, spec, ids):
    source = resolve_source(str(run["base"]))
    config = load_config(source)
    nf4 = load_quantized(source, device="cpu", compute_dtype="float32", progress=False)
    cpu = torch.device("cpu")
    adapter = read_adapter(run["adapter"])
    parts = merged_model(config, NF4Weights(nf4, cpu), adapter, spec, ids, cpu, torch.float32, progress=False)
    return config, {name: v for part in parts for name, v in part.items()}


def _reference_importance(config, merged, ids):
    """mean x² of every decoder linear's input, from a float64 stock model of the merged weights."""
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    model.load_state_dict({k: v.double() for k, v in merged.items()}, strict=False)
    model.tie_weights()
    sums, counts, handles = {}, {}, []
    for i in range(config.num_hidden_layers):
        for n in layer_plan(config.model_type).linears:
            name = f"model.layers.{i}.{n}.weight"

            def hook(m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]

            handles.append(model.get_submodule(name.removesuffix(".weight")).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {name: sums[name] / counts[name] for name in sums}


@pytest.fixture(scope="module")
def imatrix_parts(run):
    ids = calibration_windows(run["tokenizer"], run["root"] / "train.jsonl", 4, 64)
    config, plain = _stream(run, GGUFSpec("q4_k_m"), None)
    _, weighted = _stream(run, GGUFSpec("q4_k_m", imatrix=True), ids)
    return config, plain, weighted, _reference_importance(config, plain, ids)


def test_imatrix_is_the_mean_square_of_each_linear_input(imatrix_parts):
    config, plain, weighted, reference = imatrix_parts
    assert all(isinstance(v, torch.Tensor) for v in plain.values())  # without --imatrix: the merged tensors
    assert set(reference) == {k for k, v in weighted.items() if isinstance(v, ImportanceWeighted)}
    for name, expected in reference.items():
        assert torch.equal(weighted[name].weight, plain[name])
        torch.testing.assert_close(weighted[name].importance.double(), expected, rtol=1e-4, atol=1e-7)


def test_imatrix_changes_the_file_and_lowers_the_weighted_error(tmp_path, run, imatrix_parts):
    config, merged, _, importance = imatrix_parts
    files = {}
    for calibrated in (False, True):
        out = tmp_path / f"imatrix-{calibrated}"
        report = merge(options(run, out, gguf_type="q4_k_m", imatrix=calibrated))
        assert (report["calibration"] or {}).get("tokens") == (256 if calibrated else None)
        loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file(out, "q4_k_m").name, dtype=torch.float32)
        files[calibrated] = loaded.state_dict()

    def weighted_error(state, name):
        return ((state[name].double() - merged[name].double()) ** 2 * importance[name]).sum().item()

    plain = {name: weighted_error(files[False], name) for name in importance}
    calibrated = {name: weighted_error(files[True], name) for name in importance}
    assert any(not torch.equal(files[True][n], files[False][n]) for n in importance)
    assert sum(calibrated.values()) < 0.95 * sum(plain.values())
    assert sum(calibrated[n] < plain[n] for n in importance) >= 0.8 * len(importance)


def test_interrupted_export_leaves_no_output(tmp_path, run, monkeypatch):
    calls = []
    real = quantize_module.LAYER_PASSES["gguf"]

    def interrupt_second_layer(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setitem(quantize_module.LAYER_PASSES, "gguf", interrupt_second_layer)
    with pytest.raises(KeyboardInterrupt):
        merge(options(run, tmp_path / "out", gguf_type="q4_k_m"))
    assert list(tmp_path.iterdir()) == []


def test_gguf_options_are_checked(tmp_path, run, capsys):
    with pytest.raises(MergeError, match=r"--quantize gguf needs --gguf-type, one of f16, bf16, q8_0"):
        merge(options(run, tmp_path / "o"))
    with pytest.raises(MergeError, match="got 'q3_k'"):
        merge(options(run, tmp_path / "o", gguf_type="q3_k"))
    with pytest.raises(MergeError, match=r"--group-size, --no-sym do not apply to --quantize gguf"):
        merge(options(run, tmp_path / "o", gguf_type="q4_0", group_size=64, sym=False))
    with pytest.raises(MergeError, match="--gguf-type and --imatrix apply to --quantize gguf only"):
        merge(options(run, tmp_path / "o", quantize="rtn", imatrix=True))
    adapter = str(run["adapter"])
    code = main(
        ["merge", adapter, "--out", str(tmp_path / "o"), "--quantize", "gguf", "--gguf-type", "q4_0", "--bits", "8"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "qlora-kit: error: --bits does not apply to --quantize gguf" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "cli"
    assert main(["merge", adapter, "--out", str(out), "--quantize", "gguf", "--gguf-type", "q8_0", "--no-eval"]) == 0
    assert gguf_file(out, "q8_0").is_file() and f"GGUF file {gguf_file(out, 'q8_0')}" in capsys.readouterr().out
