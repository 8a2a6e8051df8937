"""Fine-tune a 65B-shape model on one GPU capped at 48 GB: peak memory by part, and tokens/s (CUDA).

The process is capped with torch.cuda.set_per_process_memory_fraction. The model is
built directly in NF4 with double quantization, layer by layer on the GPU (random
weights, through the same code path as loading a real checkpoint). LoRA r=64 on all
linear layers (the QLoRA paper's setting), bitsandbytes' PagedAdamW8bit, non-reentrant
gradient checkpointing, seq 2048, batch 1, 5 optimizer steps (the first 2 untimed: they
allocate the optimizer state and pinned buffers). `--side stock`
runs transformers + peft + bitsandbytes the same way (see bench_train.py).

Sides: `stock`; `ours-plain` (our stack, no memory levers); `ours` (with the levers of
`--levers`, all by default: `oib` = training.optimizer_in_backward, the optimizer steps
each decoder layer's LoRA tensors inside backward so their gradients never coexist;
`offload` = training.offload_activations + offload_embeddings, checkpointed layer inputs
and the input embedding table live in CPU memory; `adapters` = training.offload_adapters,
the LoRA weights live in CPU memory and a layer's come to the GPU in bf16 while it runs).
Our sides are recipes/bench.yaml with this benchmark's settings (BASE), the levers' recipe keys
and the command line's key=value overrides, built by the builder train() uses.

    python scripts/bench_memory.py                                   # LLaMA-65B shape, ours
    python scripts/bench_memory.py --side stock,ours-plain,ours --json mem.json
    python scripts/bench_memory.py --side ours --levers oib --layers 20   # one lever, fewer layers
    python scripts/bench_memory.py --shape llama-2-70b data.max_seq_len=4096    # the stretch target
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from bench_common import bench_recipe, build_ours, make_optimizer
from bench_train import build_stock

from qlora_kit.model.build import SHAPES, llama_config

# This benchmark's settings over recipes/bench.yaml: the QLoRA paper's r=64, one sequence of 2048.
BASE = ["lora.r=64", "lora.alpha=128", "data.max_seq_len=2048", "training.batch_size=1"]
# --levers: the recipe keys each lever sets on the ours side.
LEVERS = {
    "oib": ["training.optimizer_in_backward=true"],
    "offload": ["training.offload_activations=true", "training.offload_embeddings=true"],
    "adapters": ["training.offload_adapters=true"],
}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run(side: str, config, args) -> dict:
    levers = set(args.levers.split(",")) if side == "ours" else set()
    recipe = bench_recipe([*BASE, *args.overrides, *(key for lever in sorted(levers) for key in LEVERS[lever])])
    batch, seq = recipe.training.batch_size, recipe.data.max_seq_len

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if side == "stock":
        import bitsandbytes as bnb

        model, step_loss = build_stock(config, recipe.lora.r, True)
        optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:
        built = build_ours(recipe, config, total_steps=args.steps)
        model, optimizer = built.model, make_optimizer(built, recipe)

        def step_loss(ids, model=model):
            return model(input_ids=ids, labels=ids)["loss"]

    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    lora = [p for p in model.parameters() if p.requires_grad]
    frozen = [t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad and t.is_cuda]
    parts = {"frozen weights (NF4 + constants, embeddings, norms)": _bytes(frozen), "LoRA weights": _bytes(lora)}
    # With optimizer_in_backward: one optimizer per decoder layer, each stepped by a gradient hook inside backward.
    optimizers = list(getattr(optimizer, "optimizer_dict", {}).values()) or [optimizer]
    in_backward = "oib" in levers
    g = torch.Generator("cuda").manual_seed(1)
    step_times, losses = [], []
    after_build = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    peak, forward_peak, reserved = 0, 0, 0
    for _ in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda", generator=g)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_loss(ids)
        forward_peak = max(forward_peak, torch.cuda.max_memory_allocated())
        loss.backward()
        parts["gradients (left after backward)"] = _bytes(p.grad for p in lora if p.grad is not None)
        if not in_backward:
            optimizers[0].step()
            optimizers[0].zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        peak = max(peak, torch.cuda.max_memory_allocated())
        reserved = max(reserved, torch.cuda.max_memory_reserved())
    # Paged optimizer state lives in CUDA unified memory, outside torch's allocator: counted apart.
    parts["optimizer state (paged, not in peak)"] = _bytes(
        v for opt in optimizers for state in opt.state.values() for v in state.values() if torch.is_tensor(v)
    )
    parts["activations, gradients in flight, temporaries (peak - weights)"] = peak - after_build
    parts["  of which at the forward pass's peak"] = forward_peak - after_build
    timed = step_times[args.warmup :] or step_times[-1:]
    step = sorted(timed)[len(timed) // 2]
    result = {
        "side": side,
        "levers": sorted(levers),
        "build_s": build_s,
        "step_s": step,
        "tokens_per_s": batch * seq / step,
        "peak_allocated": peak,
        "peak_reserved": reserved,
        "parts": parts,
        "losses": losses,
    }
    del model, optimizers, lora, frozen
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-65b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--cap-gb", type=float, default=48.0, help="per-process GPU memory cap, GB")
    parser.add_argument("--side", default="ours", help="comma-separated: stock, ours-plain, ours")
    parser.add_argument(
        "--levers", default="oib,offload,adapters", help="the ours side's levers: oib, offload, adapters"
    )
    parser.add_argument("--json")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe keys over recipes/bench.yaml and this benchmark's settings, e.g. data.max_seq_len=4096",
    )
    args = parser.parse_args()
    recipe = bench_recipe([*BASE, *args.overrides])  # checked before anything is built
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 1e9 / total))
    config = llama_config(args.shape, **({"num_hidden_layers": args.layers} if args.layers else {}))
    results = {
        "device": torch.cuda.get_device_name(),
        "shape": args.shape,
        "layers": config.num_hidden_layers,
        "seq": recipe.data.max_seq_len,
        "batch": recipe.training.batch_size,
        "rank": recipe.lora.r,
        "overrides": args.overrides,
        "cap_gb": args.cap_gb,
        "sides": {},
    }
    sides = args.side.split(",")
    if set(sides) - {"stock", "ours-plain", "ours"}:
        parser.error(f"unknown --side {args.side}")
    levers = set(args.levers.split(","))
    if levers - {"oib", "offload", "adapters"} or ("adapters" in levers and "oib" not in levers):
        parser.error(f"--levers {args.levers}: choose from oib, offload, adapters (adapters needs oib)")
    for side in sides:
        try:
            results["sides"][side] = run(side, config, args)
        except torch.OutOfMemoryError as e:
            results["sides"][side] = {"side": side, "error": "out of memory: " + str(e).splitlines()[0][:200]}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))

    gb = 1e-9
    print(
        f"\n{args.shape} ({config.num_hidden_layers} layers), seq {results['seq']}, batch {results['batch']}, "
        f"LoRA r={results['rank']}, "
        f"cap {args.cap_gb:.0f} GB, {results['device']}"
    )
    for side, r in results["sides"].items():
        if "error" in r:
            print(f"{side}: {r['error']}")
            continue
        name = f"{side} ({','.join(r['levers'])})" if r["levers"] else side
        print(
            f"{name}: peak allocated {r['peak_allocated'] * gb:.1f} GB, reserved {r['peak_reserved'] * gb:.1f} GB, "
            f"{r['tokens_per_s']:.0f} tokens/s ({r['step_s']:.2f} s/step), built in {r['build_s']:.1f} s"
        )
        for part, size in r["parts"].items():
            print(f"    {part:60}{size * gb:8.2f} GB")
    stock = results["sides"].get("stock", {})
    if "peak_allocated" in stock:
        for side, r in results["sides"].items():
            if side != "stock" and "peak_allocated" in r:
                print(
                    f"{side} vs stock: peak {r['peak_allocated'] / stock['peak_allocated']:.3f}x, "
                    f"tokens/s {r['tokens_per_s'] / stock['tokens_per_s']:.2f}x"
                )


if __name__ == "__main__":
    main()
