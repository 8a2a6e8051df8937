"""Loading an NF4 model on the GPU: time and peak memory, ours against transformers + bitsandbytes.

1. Builds a random-weight model of the chosen shape directly in NF4 on the GPU
   (qlora_kit.model.build), reporting seconds and peak allocated memory.
2. Writes the same shape as a sharded bf16 safetensors checkpoint, then loads it
   with our streaming loader and with `from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double
   quant))`, reporting load time and peak allocated GPU memory against the NF4 model's size.

    python scripts/bench_load.py --shape llama-3.2-1b --json load.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from qlora_kit.model.build import SHAPES, build_random_quantized, llama_config, random_tensors
from qlora_kit.model.load import empty_model, load_quantized, model_bytes, nf4_bytes


def write_checkpoint(config, directory: Path, shard_bytes: int = 2 * 2**30) -> int:
    """A random bf16 checkpoint in transformers' sharded layout, written tensor by tensor."""
    from safetensors.torch import save_file

    config.save_pretrained(directory)
    shard, size, index, total = {}, 0, {}, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for key, tensor in random_tensors(empty_model(config, torch.bfloat16), torch.device("cpu")):
        shard[key] = tensor
        size += tensor.numel() * 2
        total += tensor.numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    return total


def measure(fn):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start, torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--skip-disk", action="store_true", help="only the random build on the GPU")
    parser.add_argument("--json")
    args = parser.parse_args()
    config = llama_config(args.shape, **({"num_hidden_layers": args.layers} if args.layers else {}))
    rows, results = (
        [],
        {"shape": args.shape, "layers": config.num_hidden_layers, "device": torch.cuda.get_device_name()},
    )

    model, seconds, peak = measure(lambda: build_random_quantized(config, "cuda", progress=False))
    results["random_build"] = {
        "seconds": seconds,
        "peak_allocated": peak,
        "model_bytes": model_bytes(model),
        "nf4_bytes": nf4_bytes(model),
    }
    rows.append(("ours: random weights built on GPU", seconds, peak, model_bytes(model)))
    del model

    if not args.skip_disk:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        with tempfile.TemporaryDirectory(dir=".") as tmp:
            ckpt = Path(tmp)
            results["checkpoint_bytes"] = write_checkpoint(config, ckpt)
            model, seconds, peak = measure(
                lambda: load_quantized(str(ckpt), device="cuda", compute_dtype="bfloat16", progress=False)
            )
            results["ours_load"] = {"seconds": seconds, "peak_allocated": peak, "model_bytes": model_bytes(model)}
            rows.append(("ours: streaming load of safetensors", seconds, peak, model_bytes(model)))
            del model
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            model, seconds, peak = measure(
                lambda: AutoModelForCausalLM.from_pretrained(
                    ckpt, quantization_config=bnb, dtype=torch.bfloat16, device_map="cuda"
                )
            )
            size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            results["stock_load"] = {"seconds": seconds, "peak_allocated": peak, "model_bytes": size}
            rows.append(("transformers + bitsandbytes load", seconds, peak, size))
            del model

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    gib = 1 / 2**30
    print(f"\n{args.shape} ({config.num_hidden_layers} layers) on {results['device']}")
    print(f"{'':40}{'seconds':>10}{'peak GiB':>10}{'model GiB':>11}")
    for label, seconds, peak, size in rows:
        print(f"{label:40}{seconds:10.1f}{peak * gib:10.2f}{size * gib:11.2f}")


if __name__ == "__main__":
    main()
