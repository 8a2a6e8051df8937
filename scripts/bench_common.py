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


def kernels_by_stream(events) -> dict[int, list]:
    """A profiled step's CUDA kernel events (``prof.events()``), per stream."""
    from torch.autograd import DeviceType

    streams: dict[int, list] = {}
    for e in events:
        if e.device_type == DeviceType.CUDA:
            streams.setdefault(e.device_resource_id, []).append(e)
    return streams


def gpu_timeline(events) -> str:
    """Lines on a profiled step's CUDA kernels (``torch.profiler``'s ``prof.events()``): per stream and
    for the GPU as a whole, how long kernels ran against the span from the first kernel to the last. A
    compute stream idle for much of the span points at the host (launches, syncs), not at the kernels."""
    streams = {
        stream: [(e.time_range.start, e.time_range.end) for e in kernels]
        for stream, kernels in kernels_by_stream(events).items()
    }
    if not streams:
        return "no CUDA kernels recorded"
    everything = [interval for intervals in streams.values() for interval in intervals]
    span = max(end for _, end in everything) - min(start for start, _ in everything)
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


def idle_report(events, top: int = 20, min_gap_us: float = 5.0) -> str:
    """Lines on where the busiest stream of a profiled step (CPU and CUDA activity) sat idle between kernels.

    Each gap is put down to the CPU op that launched the kernel after it, and to the backward node
    that op ran in (``[forward]`` outside one). ``host``: the kernel was launched after the stream
    had gone idle, so the GPU waited for Python; ``wait``: it was launched before, so it waited for
    something else (an event: a copy on another stream).
    """
    from torch.autograd import DeviceType

    streams = kernels_by_stream(events)
    if not streams:
        return "no CUDA kernels recorded"
    main = sorted(max(streams.values(), key=len), key=lambda e: e.time_range.start)
    # A kernel and the CUDA runtime call that launched it (cudaLaunchKernel, ...) share their
    # correlation id; the op that made that call encloses it on the host thread.
    launches = {e.id: e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("cu")}
    groups: dict[tuple[str, str, str], list[float]] = {}
    reach = main[0].time_range.end
    for k in main[1:]:
        idle_from, gap = reach, k.time_range.start - reach
        reach = max(reach, k.time_range.end)
        if gap < min_gap_us:
            continue
        launch = launches.get(k.id)
        kind, node, name = "?", "[unattributed]", k.name
        if launch is not None:
            kind = "host" if launch.time_range.start >= idle_from else "wait"
            op = launch.cpu_parent
            name = op.name if op is not None else launch.name
            node, parent = "[forward]", op
            while parent is not None:  # the innermost: a recompute's ops sit in the checkpoint's own node
                if parent.name.startswith("autograd::engine::evaluate_function: "):
                    node = parent.name.split(": ", 1)[1]
                    break
                parent = parent.cpu_parent
        key = (kind, node, name)
        groups.setdefault(key, []).append(gap)
    total = {kind: sum(sum(g) for key, g in groups.items() if key[0] == kind) for kind in ("host", "wait", "?")}
    lines = [
        f"idle gaps >= {min_gap_us:g} us on the busiest stream: {sum(total.values()) / 1e3:.1f} ms "
        f"(host late {total['host'] / 1e3:.1f} ms, waiting {total['wait'] / 1e3:.1f} ms, "
        f"launch not found {total['?'] / 1e3:.1f} ms)"
    ]
    for (kind, node, name), gaps in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"  {sum(gaps) / 1e3:7.2f} ms {len(gaps):5d} gaps  {kind:4s}  {node[:50]:50s} {name[:50]}")
    return "\n".join(lines)
