"""What the GPU benchmarks share: the recipe they train, the model it builds, a profiled step's timeline.

A benchmark's "ours" side is recipes/bench.yaml plus key=value overrides, built by
qlora_kit.pipelines.builder.build_training_model, the function train() uses, so its numbers
are what a user's recipe with the same keys gets.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_kit.config import Recipe, load_recipe
from qlora_kit.pipelines.builder import TrainingModel, build_training_model

BENCH_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "bench.yaml"


def bench_recipe(overrides: list[str]) -> Recipe:
    """recipes/bench.yaml with ``key=value`` overrides (checked like any recipe's)."""
    return load_recipe(BENCH_RECIPE, overrides)


def build_ours(
    recipe: Recipe, config, device: torch.device | str = "cuda", total_steps: int = 1, **kwargs
) -> TrainingModel:
    """The training model ``recipe`` builds, with random NF4 weights of ``config``'s shape, in training mode."""
    built = build_training_model(
        recipe, device, random_config=config, total_steps=total_steps, progress=False, **kwargs
    )
    built.model.train()
    return built


def make_optimizer(built: TrainingModel, recipe: Recipe, sharded: bool = False) -> torch.optim.Optimizer:
    """The optimizer the Trainer would make for ``recipe``: the builder's in-backward dummy when it made one,
    else the recipe's optimizer (bitsandbytes' on CUDA, torch AdamW on the CPU or under FSDP)."""
    from qlora_kit.pipelines.optim import optimizer_class, optimizer_name

    if built.optimizers[0] is not None:
        return built.optimizers[0]
    params = [p for p in built.model.parameters() if p.requires_grad]
    t = recipe.training
    cls = optimizer_class(optimizer_name(t.optimizer, params[0].device, sharded))
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals (kernels that overlap count once)."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def gpu_timeline(events) -> str:
    """Lines on a profiled step's CUDA kernels (``torch.profiler``'s ``prof.events()``): per stream and
    for the GPU as a whole, how long kernels ran against the span from the first kernel to the last. A
    compute stream idle for much of the span points at the host (launches, syncs), not at the kernels."""
    from torch.autograd import DeviceType

    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    if not kernels:
        return "no CUDA kernels recorded"
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    streams: dict[int, list[tuple[float, float]]] = {}
    for e in kernels:
        streams.setdefault(e.device_resource_id, []).append((e.time_range.start, e.time_range.end))
    everything = [interval for intervals in streams.values() for interval in intervals]
    lines = [
        f"kernels from first to last: {span / 1e3:.1f} ms; some kernel running: {busy_time(everything) / span:.0%}"
    ]
    busy = {stream: busy_time(intervals) for stream, intervals in streams.items()}
    for stream in sorted(busy, key=busy.get, reverse=True):
        lines.append(
            f"  stream {stream}: {len(streams[stream])} kernels, busy {busy[stream] / 1e3:.1f} ms "
            f"({busy[stream] / span:.0%})"
        )
    return "\n".join(lines)
