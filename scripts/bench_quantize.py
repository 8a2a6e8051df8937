"""GPTQ and AWQ speed on a Llama-3-8B-shape model (random weights), one decoder layer at a time.

Builds the NF4 model directly on the GPU (qlora_kit.model.build), keeps its decoder layers on
the CPU as `qlora-kit merge` does, and runs the merge driver (no adapter) with random
calibration token ids (128 x 2048 by default), timing every layer, including packing each
layer into its checkpoint layout (but not the disk writes). Prints seconds per layer, the
total, and the peak GPU memory; with --layers N it builds and times N layers and
extrapolates to the shape's layer count.

    python scripts/bench_quantize.py                           # all 32 layers, GPTQ then AWQ
    python scripts/bench_quantize.py --layers 4 --json q.json  # 4 layers, extrapolated to 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qlora_kit.model.build import SHAPES, build_random_quantized, llama_config
from qlora_kit.pipelines.base_weights import NF4Weights
from qlora_kit.pipelines.layerwise import merged_model
from qlora_kit.pipelines.quantize import QuantSpec
from qlora_kit.quant.intq import IntQuantWeight
from qlora_kit.quant.packing import pack_awq_gemm, pack_gptq_v1


def time_method(model, config, spec: QuantSpec, ids: torch.Tensor, device: torch.device) -> dict:
    """Seconds of every step of the driver: [embeddings, layer 0 (+ calibration capture), ..., final norm]."""
    pack = pack_gptq_v1 if spec.checkpoint == "gptq" else pack_awq_gemm
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    steps = []
    start = last = time.perf_counter()
    parts = merged_model(config, NF4Weights(model, device), None, spec, ids, device, torch.bfloat16, progress=False)
    for part in parts:
        for value in part.values():  # what the checkpoint writer does with each layer, short of writing it
            if isinstance(value, IntQuantWeight):
                for t in pack(value).values():
                    t.cpu()
        torch.cuda.synchronize(device)
        now = time.perf_counter()
        steps.append(now - last)
        last = now
    layers = steps[1:-1]
    return {
        "layer_seconds": [round(s, 3) for s in layers],
        "median_layer_seconds": statistics.median(layers),
        "total_seconds": last - start,
        "peak_gib": (torch.cuda.max_memory_allocated(device) - base) / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, help="time this many layers and extrapolate (default: all)")
    parser.add_argument("--methods", nargs="+", default=["gptq", "awq"], choices=["gptq", "awq", "rtn"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", action="store_true", help="GPTQ with act-order")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    device = torch.device("cuda")
    full_layers = SHAPES[args.shape]["num_hidden_layers"]
    layers = min(args.layers or full_layers, full_layers)
    config = llama_config(args.shape, num_hidden_layers=layers)
    model = build_random_quantized(config, device, torch.bfloat16, progress=False)
    model.model.layers.to("cpu")  # as `qlora-kit merge` holds them: one layer at a time goes to the GPU
    ids = torch.randint(0, config.vocab_size, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))

    results = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "group_size": args.group_size,
        "layers_timed": layers,
        "layers_total": full_layers,
        "methods": {},
    }
    for method in args.methods:
        spec = QuantSpec(method, 4, args.group_size, method != "awq", args.act_order and method == "gptq")
        r = time_method(model, config, spec, ids, device)
        # The layers not timed cost what the timed ones did (layer 0 also carries the calibration capture).
        r["estimated_total_seconds"] = r["total_seconds"] + r["median_layer_seconds"] * (full_layers - layers)
        results["methods"][spec.label] = r
        print(f"{spec.label}: seconds per layer {r['layer_seconds']}", flush=True)

    print(
        f"\n{args.shape}, {args.samples} x {args.seq_len} calibration tokens, group size {args.group_size}, "
        f"{layers} of {full_layers} layers timed on {results['device']}"
    )
    print(f"{'method':12}{'s/layer':>10}{'timed (s)':>12}{f'total {full_layers} layers (s)':>24}{'peak GPU GiB':>14}")
    for label, r in results["methods"].items():
        print(
            f"{label:12}{r['median_layer_seconds']:>10.2f}{r['total_seconds']:>12.1f}"
            f"{r['estimated_total_seconds']:>24.1f}{r['peak_gib']:>14.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
