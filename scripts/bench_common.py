"""What the GPU benchmarks share: the recipe they train and the model it builds.

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
