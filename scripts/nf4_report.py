"""How much NF4 + double quantization changes a model, and what loading it costs in memory.

Loads the model twice: in full precision through stock transformers, and in NF4
through qlora-kit's streaming loader. Prints logit agreement, held-out perplexity of
both, the NF4 model's size and the loader's peak memory (RSS growth while loading,
for the GGUF source and for a sharded safetensors copy of the same weights).
Memory is the growth of anonymous RSS: memory-mapped checkpoint pages are page cache.

    python scripts/nf4_report.py                       # the embedded SmolLM2-135M-Instruct
    python scripts/nf4_report.py --json nf4_report.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from qlora_kit.model.load import load_full_precision, load_quantized, model_bytes, nf4_bytes
from qlora_kit.model.sources import load_tokenizer, resolve_source
from qlora_kit.pipelines.evaluate import logit_agreement, perplexity

HELDOUT = Path(__file__).resolve().parent.parent / "examples" / "heldout" / "essays.txt"


def _anon_rss_bytes() -> int:
    # statm: size resident shared ...; resident - shared = anonymous memory (mmapped files excluded,
    # since safetensors and GGUF files are memory-mapped and their pages are cache, not our memory).
    resident, shared = map(int, Path("/proc/self/statm").read_text().split()[1:3])
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_growth(fn):
    """Run fn() and return (result, peak growth of anonymous RSS in bytes), sampled every millisecond."""
    before, peak, done = _anon_rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], _anon_rss_bytes()) - before


def bitsandbytes_nf4_copy(model):
    """An independent NF4 reference: the same model with each decoder linear round-tripped through bitsandbytes."""
    import copy

    import bitsandbytes.functional as bnbF

    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                packed, state = bnbF.quantize_4bit(m.weight, quant_type="nf4", compress_statistics=True, blocksize=64)
                m.weight.copy_(bnbF.dequantize_4bit(packed, state))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model.name_or_path (default: the embedded SmolLM2)")
    parser.add_argument("--text", default=str(HELDOUT), help="held-out text file for perplexity")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    source = resolve_source(args.model)
    tokenizer = load_tokenizer(source)
    ids = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[0]

    start = time.perf_counter()
    nf4, gguf_peak = peak_memory_growth(
        lambda: load_quantized(source, device="cpu", compute_dtype="float32", progress=False)
    )
    load_seconds = time.perf_counter() - start
    full = load_full_precision(source, dtype=torch.float32)

    with tempfile.TemporaryDirectory() as tmp:
        full.save_pretrained(tmp, max_shard_size="100MB")
        checkpoint_bytes = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        _, shards_peak = peak_memory_growth(
            lambda: load_quantized(tmp, device="cpu", compute_dtype="float32", progress=False)
        )

    results = {
        "model": source.name,
        "ppl_bitsandbytes_nf4": perplexity(bitsandbytes_nf4_copy(full), ids, args.seq_len),
        "tokens": ids.numel(),
        "ppl_full": perplexity(full, ids, args.seq_len),
        "ppl_nf4": perplexity(nf4, ids, args.seq_len),
        **logit_agreement(nf4, full, ids, args.seq_len),
        "nf4_linear_bytes": nf4_bytes(nf4),
        "nf4_model_bytes": model_bytes(nf4),
        "full_model_bytes": model_bytes(full),
        "load_seconds_gguf": load_seconds,
        "load_peak_anon_rss_growth_gguf": gguf_peak,
        "safetensors_checkpoint_bytes": checkpoint_bytes,
        "load_peak_anon_rss_growth_safetensors": shards_peak,
    }
    results["ppl_increase_percent"] = 100 * (results["ppl_nf4"] / results["ppl_full"] - 1)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))

    mb = 1 / 2**20
    print(f"\nNF4 + double quantization on {results['model']} ({results['tokens']} held-out tokens)")
    print(
        f"  perplexity      full {results['ppl_full']:.3f}   nf4 {results['ppl_nf4']:.3f}   (+{results['ppl_increase_percent']:.2f}%)"
        f"   bitsandbytes nf4 {results['ppl_bitsandbytes_nf4']:.3f}"
    )
    print(
        f"  logits          relative L2 {results['relative_l2']:.4f}   top-1 agreement {results['top1_agreement']:.3f}"
        f"   KL {results['kl_nats_per_token']:.4f} nats/token"
    )
    print(
        f"  model size      full {results['full_model_bytes'] * mb:.0f} MiB   nf4 {results['nf4_model_bytes'] * mb:.0f} MiB"
        f" (decoder linears {results['nf4_linear_bytes'] * mb:.0f} MiB)"
    )
    print(
        f"  load peak mem   from GGUF +{gguf_peak * mb:.0f} MiB ({load_seconds:.1f} s)   from "
        f"{checkpoint_bytes * mb:.0f} MiB of safetensors shards +{shards_peak * mb:.0f} MiB"
    )


if __name__ == "__main__":
    main()
