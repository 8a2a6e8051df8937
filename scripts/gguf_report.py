"""GGUF exports measured by llama.cpp itself: every file type, plain and imatrix, beside llama.cpp's own quantizer.

For one adapter directory (the quickstart's):

1. ``qlora-kit merge --quantize none``, evaluated: the merged bf16 model's perplexity and exact match in
   transformers (the reference); ``qlora-kit merge --quantize gguf --gguf-type T`` for every type, and with
   ``--imatrix`` for the types in ``--imatrix-types``;
2. llama.cpp's own quantizer (``llama_model_quantize``, no imatrix) of our f16 file to every quantized type;
3. every file loaded in llama.cpp (llama-cpp-python): perplexity on the held-out text (non-overlapping
   windows of ``--window`` tokens, the NLL computed here from llama.cpp's logits, the same token ids for
   every file), a chat answer through the file's own template (does it stop by itself?), exact match on
   the recipe's test examples (greedy chat completions) and the file size;
4. per K-quant tensor, the RMSE against the fp32 merged weights of our export and of llama.cpp's
   quantization of our f16 file, and whether our quantizer given that f16 tensor writes llama.cpp's bytes.

    pip install llama-cpp-python==0.3.36        # builds llama.cpp (minutes)
    python train.py recipes/quickstart.yaml
    python scripts/gguf_report.py outputs/quickstart --out /tmp/gguf-report
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0")
K_TYPES = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s")
CHAT_PROMPT = "Write this date in ISO 8601 format (YYYY-MM-DD). Reply with the date only.\nthe 5th of March, 2021"


def qlora_kit(*args: str) -> None:
    print("+ qlora-kit", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "qlora_kit.cli", *args], check=True)


def export(adapter: Path, out: Path, gguf_type: str, imatrix: bool, args) -> tuple[Path, float | None]:
    """``qlora-kit merge --quantize gguf`` into ``out`` (a file from an earlier run is kept); the file, seconds."""
    seconds = None
    if not list(out.glob("*.gguf")):
        command = ["merge", str(adapter), "--out", str(out), "--overwrite", "--no-eval", "--quantize", "gguf"]
        command += ["--gguf-type", gguf_type]
        if imatrix:
            command += ["--imatrix", "--calibration-samples", str(args.calibration_samples)]
            command += ["--calibration-seq-len", str(args.calibration_seq_len)]
        start = time.perf_counter()
        qlora_kit(*command)
        seconds = round(time.perf_counter() - start, 1)
    (path,) = out.glob("*.gguf")
    return path, seconds


def llama_cpp_quantize(source: Path, target: Path, gguf_type: str) -> Path:
    """llama.cpp's ``llama_model_quantize`` of ``source`` to ``gguf_type`` (default parameters: no imatrix)."""
    import llama_cpp

    if not target.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
        params.nthread = 2
        print(f"+ llama_model_quantize {source.name} -> {target.name}", flush=True)
        if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize failed for {target}")
    return target


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(llm, ids: list[int], window: int) -> float:
    """exp(mean NLL) over non-overlapping windows, every token after a window's first predicted once
    (as qlora_kit.pipelines.evaluate.perplexity does in transformers)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        logp = log_softmax(np.asarray(llm.scores[: len(chunk) - 1]))
        nll -= logp[np.arange(len(chunk) - 1), chunk[1:]].sum()
        count += len(chunk) - 1
    return float(np.exp(nll / count))


def chat(llm, messages: list[dict], max_tokens: int) -> tuple[str, str]:
    """A greedy chat completion through the file's template: (answer, finish reason: stop or length)."""
    choice = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0)["choices"][0]
    return choice["message"]["content"] or "", choice["finish_reason"]


def measure(path: Path, text: str, ids: list[int], examples: list[dict], budget: int, match: str, args) -> dict:
    from llama_cpp import Llama

    from qlora_kit.pipelines.matching import answers_match

    start = time.perf_counter()
    llm = Llama(
        str(path),
        n_ctx=max(args.window, 1024),
        n_batch=args.window,
        logits_all=True,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    row = {
        "file": path.name,
        "mib": round(path.stat().st_size / 2**20, 1),
        "perplexity": perplexity(llm, ids, args.window),
        # the file's vocabulary and pre-tokenizer in llama.cpp's tokenizer, against the tokenizer's own ids
        "same_tokens": llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids,
    }
    row["chat"], row["finish"] = chat(llm, [{"role": "user", "content": CHAT_PROMPT}], 64)
    correct = cut = 0
    for example in examples:
        answer, finish = chat(llm, example["messages"], budget)
        correct += answers_match(match, answer, example["answer"])[0]
        cut += finish == "length"
    row |= {"exact_match": correct / len(examples), "cut": cut, "seconds_llama_cpp": round(time.perf_counter() - start)}
    print(f"  {row}", flush=True)
    return row


def tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def merged_fp32(adapter_dir: Path) -> dict[str, np.ndarray]:
    """The fp32 merged weights (the NF4 base + scale·B·A, as the export merges them) under llama.cpp's
    names and in its layout: what both our export and our f16 file were rounded from."""
    import torch

    from qlora_kit.model.adapters import read_adapter
    from qlora_kit.model.load import load_quantized
    from qlora_kit.model.sources import load_config, resolve_source
    from qlora_kit.pipelines.base_weights import NF4Weights
    from qlora_kit.pipelines.export_gguf import gguf_tensor_name, permute_qk
    from qlora_kit.pipelines.layerwise import merged_model

    adapter = read_adapter(adapter_dir)
    source = resolve_source(adapter.base, adapter.gguf_file)
    config, cpu = load_config(source), torch.device("cpu")
    nf4 = load_quantized(source, device=cpu, compute_dtype=torch.float32, progress=False)
    heads = {".attn_q.": config.num_attention_heads, ".attn_k.": config.num_key_value_heads}
    weights = {}
    for part in merged_model(config, NF4Weights(nf4, cpu), adapter, None, None, cpu, torch.float32, progress=False):
        for hf_name, value in part.items():
            name = gguf_tensor_name(hf_name)
            for key, n in heads.items():
                if config.model_type in ("llama", "mistral") and key in name:
                    value = permute_qk(value, n)
            weights[name] = value.numpy()
    return weights


def rmse_against_llama_cpp(ours: Path, theirs: Path, f16: Path, fp32: dict[str, np.ndarray]) -> dict:
    """The K-quant tensors (Q4_K, Q5_K, Q6_K) of our export and of llama.cpp's quantization of our f16 file.

    Per tensor: the RMSE of each against the fp32 merged weights (ours is rounded from them, llama.cpp's
    from their f16 rounding), and whether our quantizer, given llama.cpp's input (the f16 tensor),
    writes llama.cpp's bytes. Also: the tensors whose type differs between the two files, if any.
    """
    import torch
    from gguf.quants import dequantize

    from qlora_kit.quant.gguf import quantize

    a, b, ref = tensors(ours), tensors(theirs), tensors(f16)
    rows = []
    for name, t in a.items():
        if t.tensor_type.name not in ("Q4_K", "Q5_K", "Q6_K") or b[name].tensor_type != t.tensor_type:
            continue
        w = fp32[name].astype(np.float64)
        rmse = [float(np.sqrt(np.mean((dequantize(x.data, x.tensor_type) - w) ** 2))) for x in (t, b[name])]
        w16 = dequantize(ref[name].data, ref[name].tensor_type).astype(np.float32)
        same = np.array_equal(quantize(torch.from_numpy(w16), t.tensor_type).numpy(), np.asarray(b[name].data))
        rows.append((name, t.tensor_type.name, *rmse, bool(same)))
    return {
        "tensors": len(rows),
        "types": sorted({r[1] for r in rows}),
        "ours_at_most_llama_cpp": sum(r[2] <= r[3] for r in rows),
        "max_ratio": max((r[2] / r[3] for r in rows), default=None),
        "mean_ratio": float(np.mean([r[2] / r[3] for r in rows])) if rows else None,
        "same_bytes_from_f16": sum(r[4] for r in rows),
        "other_type": sorted(n for n in a if a[n].tensor_type != b[n].tensor_type),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the exports and report.json")
    parser.add_argument("--types", nargs="+", default=TYPES)
    parser.add_argument("--imatrix-types", nargs="*", default=["q4_0", "q4_k_m"])
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--calibration-seq-len", type=int, default=512)
    parser.add_argument("--eval-text", type=Path, default=ROOT / "examples/heldout/essays.txt")
    parser.add_argument("--window", type=int, default=512, help="perplexity window, tokens")
    parser.add_argument("--test-examples", type=int, default=200, help="the first N test examples for exact match")
    parser.add_argument(
        "--threads", type=int, default=1, help="llama.cpp threads (spinning threads crawl on a busy CPU)"
    )
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from qlora_kit.config import load_recipe
    from qlora_kit.pipelines.evaluate import generation_budget, load_test_examples

    args.out.mkdir(parents=True, exist_ok=True)
    merged = args.out / "merged-bf16"
    if not (merged / "report.json").is_file():
        qlora_kit(
            *("merge", str(args.adapter), "--out", str(merged), "--overwrite", "--eval-text", str(args.eval_text)),
            *("--test-examples", str(args.test_examples)),
        )
    reference = json.loads((merged / "report.json").read_text())["results"]

    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    text = args.eval_text.read_text(encoding="utf-8")
    ids = tokenizer(text)["input_ids"]
    recipe = load_recipe(args.adapter / "recipe.yaml")
    examples = load_test_examples(recipe, args.test_examples)
    budget = generation_budget(tokenizer, examples, recipe.eval.max_new_tokens)

    files, seconds = {}, {}
    for t in args.types:
        files[t], seconds[t] = export(args.adapter, args.out / t, t, False, args)
    for t in args.imatrix_types:
        files[f"{t} imatrix"], seconds[f"{t} imatrix"] = export(args.adapter, args.out / f"{t}-imatrix", t, True, args)
    for t in args.types:
        if t not in ("f16", "bf16"):
            files[f"llama.cpp {t}"] = llama_cpp_quantize(files["f16"], args.out / f"llama-cpp-{t}.gguf", t)

    rows = {}
    for label, path in files.items():
        cached = args.out / "measured" / f"{label}.json"  # rows of an earlier run on the same examples
        if cached.is_file() and json.loads(cached.read_text())["examples"] == len(examples):
            rows[label] = json.loads(cached.read_text())
            continue
        print(f"measuring {label}", flush=True)
        row = measure(path, text, ids, examples, budget, recipe.eval.match, args)
        rows[label] = row | {"examples": len(examples), "export_seconds": seconds.get(label)}
        cached.parent.mkdir(exist_ok=True)
        cached.write_text(json.dumps(rows[label]) + "\n")
    fp32 = merged_fp32(args.adapter)
    compared = [t for t in K_TYPES if t in args.types]
    rmse = {t: rmse_against_llama_cpp(files[t], files[f"llama.cpp {t}"], files["f16"], fp32) for t in compared}
    report = {
        "adapter": str(args.adapter),
        "eval_text": str(args.eval_text),
        "eval_tokens": len(ids),
        "window": args.window,
        "test_examples": len(examples),
        "max_new_tokens": budget,
        "calibration": {"samples": args.calibration_samples, "seq_len": args.calibration_seq_len},
        "transformers": reference,
        "llama_cpp": rows,
        "k_quant_rmse": rmse,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    print("\n| model | file MiB | perplexity (llama.cpp) | exact match (llama.cpp) | chat answer |")
    print("|---|---:|---:|---:|---|")
    for r in reference:
        print(f"| {r['model']} (transformers) | | {r['perplexity']:.2f} | {r['exact_match']:.1%} | |")
    for label, r in rows.items():
        answer = json.dumps(r["chat"]) + ("" if r["finish"] == "stop" else f" (not stopped: {r['finish']})")
        print(f"| {label} | {r['mib']} | {r['perplexity']:.2f} | {r['exact_match']:.1%} | {answer} |")
    print(
        "\n| file type | K-quant tensors | RMSE vs fp32: ours <= llama.cpp | max ratio | same bytes from f16 | other type |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for t, r in rmse.items():
        print(
            f"| {t} | {r['tensors']} ({', '.join(r['types'])}) | {r['ours_at_most_llama_cpp']} | "
            f"{r['max_ratio'] or 0:.4f} | {r['same_bytes_from_f16']} | {', '.join(r['other_type']) or '-'} |"
        )
    print(f"\nreport: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
