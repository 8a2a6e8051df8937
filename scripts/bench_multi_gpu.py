"""QLoRA on several GPUs of one machine: data-parallel scaling (DDP) and a 70B model sharded over them (FSDP).

One process per GPU, started by torchrun:

    torchrun --nproc_per_node 2 scripts/bench_multi_gpu.py --json multi_gpu.json
    torchrun --nproc_per_node 2 scripts/bench_multi_gpu.py --part fsdp lora.r=64 training.offload_activations=true
    torchrun --nproc_per_node 2 scripts/bench_multi_gpu.py --dry-run     # the whole path on the CPU (gloo), tiny shapes

ddp: the Llama-3-8B shape with random NF4 weights, LoRA on every linear, fused ops,
non-reentrant gradient checkpointing, the same per-GPU batch (seq 2048 x 4) throughout.
First every process trains alone on its own GPU (no communication: the 1-GPU rate), then
all of them under DDP (LoRA gradients all-reduced, NF4 buffers not broadcast, as the
train pipeline sets it). scaling = DDP tokens/s / 1-GPU tokens/s (ideal: the GPU count).
bf16 autocast as the Trainer applies it; bitsandbytes' PagedAdamW8bit when it imports,
else torch AdamW.

fsdp: the Llama-2-70B shape, seq 2048 x 1 per GPU, sharded by qlora_kit.model.fsdp.shard_model
as the train pipeline does under an FSDP accelerate config: the random weights are
generated and quantized on the GPU one tensor at a time and kept in CPU memory, then each
decoder layer is moved to the GPU and sharded, so no GPU ever holds the whole model.
torch AdamW (bitsandbytes' optimizers cannot step FSDP's DTensor parameters), no
autocast (the model computes in bf16 by itself, as under accelerate's FSDP). Peak memory
is torch.cuda.max_memory_allocated per GPU over the training steps, counted from the end
of building (the weights are included).

Each timed step is synchronized; s/step is the median over --steps after --warmup steps.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) can take a shared host's GPUs down; nothing here needs it.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_common import bench_recipe, build_ours, make_optimizer  # noqa: E402
from torch import nn  # noqa: E402

from qlora_kit.model.build import SHAPES, llama_config  # noqa: E402
from qlora_kit.model.fsdp import nf4_storage_bytes  # noqa: E402

# For --dry-run: a few small layers, so the whole script runs on the CPU in seconds.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)
GIB = 2**30


def model_config(shape: str, layers: int | None):
    overrides = {"num_hidden_layers": layers} if layers else {}
    if shape == "tiny":
        from transformers import LlamaConfig

        return LlamaConfig(**{**TINY, **overrides})
    return llama_config(shape, **overrides)


def build(args, config, device: torch.device, batch: int, sharded: bool = False):
    """The train pipeline's model for recipes/bench.yaml + the command line's overrides (one batch size per part).

    Under ``sharded`` it is built in CPU memory and sharded over the processes as an FSDP launch does.
    Returns the built model and its optimizer.
    """
    recipe = bench_recipe([*args.overrides, f"training.batch_size={batch}"])
    fsdp = types.SimpleNamespace(reshard_after_forward=True) if sharded else None
    built = build_ours(recipe, config, device, processes=dist.get_world_size(), fsdp=fsdp)
    return built, recipe


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, config, args, batch: int, device: torch.device, autocast: bool
) -> dict:
    """Train warmup + steps steps on random tokens (each process its own); s/step and losses."""
    g = torch.Generator(device).manual_seed(1 + dist.get_rank())
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (batch, args.seq), device=device, generator=g)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext():
            loss = model(input_ids=ids, labels=ids)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"step_s": statistics.median(times), "losses": losses}


def peak_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {
        "peak_allocated": torch.cuda.max_memory_allocated(device),
        "peak_reserved": torch.cuda.max_memory_reserved(device),
    }


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def ddp_part(args, device: torch.device) -> dict:
    """This process's step times alone on its GPU, then under DDP."""
    from torch.nn.parallel import DistributedDataParallel

    config = model_config(args.ddp_shape, args.layers)
    autocast = device.type == "cuda"
    built, recipe = build(args, config, device, args.ddp_batch)
    model = built.model
    reset_memory(device)
    alone = timed_steps(model, make_optimizer(built, recipe), config, args, args.ddp_batch, device, autocast)
    alone.update(peak_memory(device))
    dist.barrier()

    reset_memory(device)
    # The NF4 weights are buffers every process built identically: no broadcast before each forward.
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        find_unused_parameters=False,
    )
    optimizer = make_optimizer(built, recipe)
    together = timed_steps(ddp, optimizer, config, args, args.ddp_batch, device, autocast)
    together.update(peak_memory(device))
    result = {
        "shape": args.ddp_shape,
        "layers": config.num_hidden_layers,
        "batch": args.ddp_batch,
        "optimizer": type(optimizer).__name__,
        "alone": alone,
        "ddp": together,
    }
    del optimizer, ddp, model, built
    reset_memory(device)
    return result


def fsdp_part(args, device: torch.device) -> dict:
    config = model_config(args.fsdp_shape, args.layers)
    start = time.perf_counter()
    built, recipe = build(args, config, device, args.fsdp_batch, sharded=True)
    model = built.model
    build_s = time.perf_counter() - start
    local, total = nf4_storage_bytes(built.lm)
    reset_memory(device)
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    optimizer = make_optimizer(built, recipe, sharded=True)
    result = timed_steps(model, optimizer, config, args, args.fsdp_batch, device, autocast=False)
    result.update(
        peak_memory(device),
        build_s=build_s,
        nf4_local=local,
        nf4_total=total,
        after_build=weights,
        optimizer=type(optimizer).__name__,
    )
    del optimizer, model, built
    reset_memory(device)
    return {"shape": args.fsdp_shape, "layers": config.num_hidden_layers, "batch": args.fsdp_batch, **result}


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def largest(values: list[int | None]) -> int | None:
    """The largest of the processes' memory numbers (None on the CPU)."""
    return None if None in values else max(values)


def print_report(results: dict, args) -> None:
    world = results["world_size"]
    print(f"\n{results['device']}, {world} processes, LoRA r={args.rank}, seq {args.seq}")
    if "ddp" in results:
        per_rank = results["ddp"]
        r0 = per_rank[0]
        alone = statistics.mean(args.seq * r0["batch"] / r["alone"]["step_s"] for r in per_rank)
        together = world * args.seq * r0["batch"] / max(r["ddp"]["step_s"] for r in per_rank)
        print(f"\nDDP: {r0['shape']} ({r0['layers']} layers), batch {r0['batch']} per GPU, {r0['optimizer']}")
        print(f"{'':10}{'GPUs':>5}{'s/step':>9}{'tokens/s':>10}{'peak GiB (max over GPUs)':>26}")
        for label, key, gpus, rate in (("1 GPU", "alone", 1, alone), ("DDP", "ddp", world, together)):
            step = max(r[key]["step_s"] for r in per_rank)
            peak = largest([r[key].get("peak_allocated") for r in per_rank])
            print(f"{label:10}{gpus:>5}{step:9.3f}{rate:10.0f}{gib(peak):>26}")
        print(f"scaling: {together / alone:.2f}x on {world} GPUs (ideal {world:.2f}x)")
        results["ddp_summary"] = {"tokens_per_s_1gpu": alone, "tokens_per_s_ddp": together, "scaling": together / alone}
    if "fsdp" in results:
        per_rank = results["fsdp"]
        r0 = per_rank[0]
        step = max(r["step_s"] for r in per_rank)
        tokens = world * args.seq * r0["batch"] / step
        print(
            f"\nFSDP: {r0['shape']} ({r0['layers']} layers), batch {r0['batch']} per GPU, {r0['optimizer']}"
            f"{', activations offloaded' if args.offload_activations is True else ''}, built and sharded in {r0['build_s']:.1f} s"
        )
        print(
            f"{'GPU':5}{'NF4 GiB held':>14}{'of GiB':>8}{'share':>7}{'after build GiB':>17}{'peak GiB':>10}"
            f"{'peak reserved GiB':>19}"
        )
        for i, r in enumerate(per_rank):
            print(
                f"{i:<5}{gib(r['nf4_local']):>14}{gib(r['nf4_total']):>8}{r['nf4_local'] / r['nf4_total']:7.1%}"
                f"{gib(r['after_build']):>17}{gib(r.get('peak_allocated')):>10}{gib(r.get('peak_reserved')):>19}"
            )
        print(
            f"s/step {step:.3f}, {tokens:.0f} tokens/s on {world} GPUs; losses (GPU 0): "
            + " ".join(f"{x:.3f}" for x in r0["losses"])
        )
        results["fsdp_summary"] = {
            "tokens_per_s": tokens,
            "step_s": step,
            "max_peak_allocated": largest([r.get("peak_allocated") for r in per_rank]),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = sorted(SHAPES) + ["tiny"]
    parser.add_argument("--part", default="ddp,fsdp", help="comma-separated: ddp, fsdp")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo, for a dry run")
    parser.add_argument("--ddp-shape", default="llama-3-8b", choices=shapes)
    parser.add_argument("--fsdp-shape", default="llama-2-70b", choices=shapes)
    parser.add_argument("--layers", type=int, help="override the number of decoder layers of both shapes")
    parser.add_argument("--ddp-batch", type=int, default=4, help="sequences per GPU per step")
    parser.add_argument("--fsdp-batch", type=int, default=1, help="sequences per GPU per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="--device cpu, tiny shapes, seq 64, 2 steps: exercises every code path in seconds",
    )
    parser.add_argument("--json", help="write every process's numbers here (from the first process)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe keys over recipes/bench.yaml for both parts, e.g. lora.r=64 training.offload_activations=true",
    )
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.ddp_shape, args.fsdp_shape, args.steps, args.warmup = "cpu", "tiny", "tiny", 2, 1
        args.overrides = ["data.max_seq_len=64", *args.overrides]
    recipe = bench_recipe(args.overrides)  # checked before anything is built
    args.seq, args.rank, args.offload_activations = (
        recipe.data.max_seq_len,
        recipe.lora.r,
        recipe.training.offload_activations,
    )
    parts = args.part.split(",")
    if set(parts) - {"ddp", "fsdp"}:
        parser.error(f"unknown --part {args.part}")
    if "WORLD_SIZE" not in os.environ:
        parser.error("start one process per GPU with torchrun: torchrun --nproc_per_node 2 scripts/bench_multi_gpu.py")

    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --dry-run (or --device cpu)")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        if dist.get_world_size() < 2:
            parser.error("needs at least 2 processes: torchrun --nproc_per_node 2 ...")
        results = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)",
            "world_size": dist.get_world_size(),
            "args": vars(args),
        }
        if "ddp" in parts:
            results["ddp"] = gather(ddp_part(args, device))
        if "fsdp" in parts:
            results["fsdp"] = gather(fsdp_part(args, device))
        if dist.get_rank() == 0:
            print_report(results, args)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
