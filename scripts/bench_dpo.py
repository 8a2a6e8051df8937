"""DPO training step: qlora-kit against TRL's DPOTrainer on transformers + peft + bitsandbytes, in one run (CUDA).

Both sides get a Llama-shape model with random weights in NF4 + double quantization, LoRA
(r from recipes/bench.yaml, 16) on all seven projections, gradient checkpointing
(non-reentrant), bf16 autocast, bitsandbytes' PagedAdamW8bit, and the same random pairs:
``--pairs`` pairs per step, each a prompt of ``--prompt-len`` tokens followed by a chosen and a
rejected answer of ``--answer-len`` tokens, so a step runs 2 x pairs rows of prompt + answer
tokens in TRL's collator layout (the chosen rows, then the rejected rows, with a
``completion_mask`` over the answers). One step: the policy forward of all rows, the
reference forward (the same model with the adapters off, without gradients), TRL's DPO loss
(sigmoid, or the recipe's preference.loss_type and loss_weights), backward, optimizer step.
Warm-up steps are excluded; the timed steps are synchronized.

  trl:             scripts/bench_train.py's stock model (LlamaForCausalLM with bitsandbytes Linear4bit,
                   peft.get_peft_model(LoraConfig(target_modules="all-linear"))) in trl.DPOTrainer(DPOConfig(
                   beta, the recipe's preference.loss_type and loss_weights, gradient checkpointing)); the step
                   is its compute_loss (TRL's fused LM head, its reference through peft's disabled adapter:
                   the frozen "ref" copy TRL makes of an adapter it is handed is removed, so both sides'
                   reference is the base)
  ours:            recipes/bench.yaml + training.method=dpo + the command line's key=value overrides, built by
                   qlora_kit.pipelines.builder.build_training_model (what train() builds); the step is the
                   preference trainer's compute_loss, which runs TRL's DPO loss step on our model
  ours-precompute: ours, the reference log-probabilities in the batch (preference.precompute_reference:
                   computed once before training), so no reference forward in the step

Each side runs in its own process (the script runs itself with --one-side and reads one JSON
line back), so one side's allocations and kernels cannot reach the next. Packages: both sides
import torch, transformers, accelerate, peft, bitsandbytes, trl and datasets (qlora-kit's
data and preference modules import trl and datasets; trl's DPOTrainer imports datasets).

    python scripts/bench_dpo.py                                        # trl,ours on Llama-3-8B, 2 pairs of 1024+1024
    python scripts/bench_dpo.py --side trl,ours,ours-precompute --pairs 4 --prompt-len 512 --answer-len 512
    python scripts/bench_dpo.py --json out.json training.uncheckpointed_layers=8
    python scripts/bench_dpo.py --dry-run                              # the plumbing, on the CPU, in seconds
    python scripts/bench_dpo.py "preference.loss_type=[sigmoid,sft]"   # the quickstart's loss, on both sides
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIDES = ("trl", "ours", "ours-precompute")
RESULT = "bench_dpo side result: "  # the prefix of the one stdout line a side's process answers on
# --dry-run: a two-layer model with a small vocabulary, short rows, on the CPU.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TINY_VOCAB = 256


def model_config(shape: str, layers: int | None):
    from qlora_kit.model.build import llama_config

    overrides = {"num_hidden_layers": layers} if layers else {}
    if shape == "tiny":
        return llama_config("llama-3-8b", **{**TINY, "vocab_size": TINY_VOCAB, **overrides})
    return llama_config(shape, **overrides)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pair_batch(config, pairs: int, prompt_len: int, answer_len: int, device: torch.device, seed: int) -> dict:
    """Random pairs in TRL's DataCollatorForPreference layout: chosen rows, then rejected rows."""
    g = torch.Generator(device).manual_seed(seed)
    prompt = torch.randint(4, config.vocab_size, (pairs, prompt_len), device=device, generator=g)
    answers = torch.randint(4, config.vocab_size, (2 * pairs, answer_len), device=device, generator=g)
    input_ids = torch.cat([prompt.repeat(2, 1), answers], dim=1)
    completion = torch.zeros_like(input_ids)
    completion[:, prompt_len:] = 1
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion}


def word_tokenizer(vocab_size: int):
    """A tokenizer over the words t0, t1, ... (TRL's trainer needs one; the benchmark's rows are token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials + [f"t{i}" for i in range(vocab_size - len(specials))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_trl(config, recipe, device: torch.device, pairs: int, workdir: str):
    """TRL's DPOTrainer around the stock model; returns (trainer, step_loss)."""
    import datasets
    from bench_train import build_stock
    from trl import DPOConfig, DPOTrainer

    model = build_stock(config, recipe, device)
    cuda = device.type == "cuda"
    loss_types, loss_weights = recipe.preference.losses()
    args = DPOConfig(
        output_dir=workdir,
        per_device_train_batch_size=pairs,
        learning_rate=recipe.training.learning_rate,
        beta=recipe.preference.beta,
        loss_type=loss_types,
        loss_weights=loss_weights,
        max_length=None,
        gradient_checkpointing=recipe.training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=cuda,
        use_cpu=not cuda,
        report_to=[],
    )
    dummy = datasets.Dataset.from_list([{"prompt": "t4", "chosen": "t5", "rejected": "t6"}])
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=dummy, processing_class=word_tokenizer(config.vocab_size)
    )
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    return trainer, lambda batch: trainer.compute_loss(trainer.model, batch)


def build_qlora_kit(config, recipe, device: torch.device, total_steps: int, workdir: str):
    """Our preference trainer around the model build_training_model makes; returns (trainer, step_loss, built)."""
    import datasets
    from bench_common import build_ours

    from qlora_kit.pipelines.preference import _preference_trainer_class
    from qlora_kit.pipelines.train import training_arguments

    built = build_ours(recipe, config, device=device, total_steps=total_steps)
    trainer = _preference_trainer_class()(
        model=built.model,
        args=training_arguments(recipe, device, built.compute_dtype, False),
        train_dataset=datasets.Dataset.from_list([{"prompt_ids": [4], "chosen_ids": [5], "rejected_ids": [6]}]),
        processing_class=word_tokenizer(config.vocab_size),
        adapter_config=built.adapter_config,
        method="dpo",
        preference=recipe.preference,
    )
    return trainer, lambda batch: trainer.compute_loss(built.model, batch), built


def run_side(side: str, args, device: torch.device) -> dict:
    from bench_common import bench_recipe, make_optimizer

    cuda = device.type == "cuda"
    config = model_config(args.shape, args.layers)
    seq = args.prompt_len + args.answer_len
    workdir = tempfile.mkdtemp(prefix=f"bench-dpo-{side}-")
    overrides = ["training.method=dpo", f"data.max_seq_len={seq}", f"output.dir={workdir}", *args.overrides]
    if side == "ours-precompute":
        overrides.append("preference.precompute_reference=true")
    recipe = bench_recipe(overrides)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = args.warmup + args.steps
    if side == "trl":
        try:
            import bitsandbytes  # noqa: F401
            import trl  # noqa: F401
        except ImportError as e:
            return {"side": side, "skipped": f"{e}"}
        trainer, step_loss = build_trl(config, recipe, device, args.pairs, workdir)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        if cuda:
            import bitsandbytes as bnb

            optimizer = bnb.optim.PagedAdamW8bit(params, lr=recipe.training.learning_rate)
        else:  # the CPU dry run: bitsandbytes' paged optimizers need CUDA
            optimizer = torch.optim.AdamW(params, lr=recipe.training.learning_rate)
    else:
        trainer, step_loss, built = build_qlora_kit(config, recipe, device, steps, workdir)
        params = [p for p in built.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(built, recipe)
    weights_bytes = torch.cuda.memory_allocated() if cuda else None
    batches = [pair_batch(config, args.pairs, args.prompt_len, args.answer_len, device, seed=i) for i in range(steps)]
    if side == "ours-precompute":
        from qlora_kit.pipelines.preference import answer_logps

        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            for batch in batches:
                batch["ref_chosen_logps"], batch["ref_rejected_logps"] = (
                    answer_logps(built.model, batch, reference=True)[0].float().chunk(2)
                )
        if cuda:  # the step's memory, not the precomputation's
            torch.cuda.reset_peak_memory_stats()

    losses, times = [], []
    for i, batch in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = step_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step = sorted(times)[len(times) // 2]
    rows = 2 * args.pairs
    return {
        "side": side,
        "step_s": step,
        "tokens_per_s": rows * seq / step,
        "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None,
        "weights_bytes": weights_bytes,
        "lora_params": sum(p.numel() for p in params),
        "rows": rows,
        "seq": seq,
        "losses": losses,
        "reward_margins": trainer._metrics["train"]["rewards/margins"][-3:],
    }


def one_side(args) -> None:
    """The child: measure one side and print its result as one JSON line (a skip or an error too)."""
    device = torch.device(args.device)
    try:
        result = run_side(args.one_side, args, device)
    except torch.OutOfMemoryError as e:
        result = {"side": args.one_side, "error": f"out of memory: {str(e).splitlines()[0]}"}
    print(RESULT + json.dumps(result), flush=True)


def run_in_subprocess(side: str, argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-side", side, *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"side": side, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"side": side, "error": f"exit {proc.returncode}:\n" + "\n".join(tail)}


def report(results: list[dict]) -> str:
    """The table: tokens/s, step time and peak memory per side, and each side's speed and memory against trl."""
    base = next((r for r in results if r["side"] == "trl" and "step_s" in r), None)
    lines = [f"{'side':18}{'tokens/s':>12}{'step ms':>10}{'peak alloc GB':>15}{'vs trl':>9}{'mem vs trl':>12}"]
    for r in results:
        if "step_s" not in r:
            lines.append(f"{r['side']:18}{r.get('skipped') or r.get('error')}")
            continue
        peak = r["peak_allocated"]
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        memory = f"{peak / base['peak_allocated']:.2f}x" if base and peak and base["peak_allocated"] else "-"
        peak_gb = f"{peak / 1e9:.2f}" if peak else "-"
        lines.append(
            f"{r['side']:18}{r['tokens_per_s']:>12.0f}{1000 * r['step_s']:>10.1f}{peak_gb:>15}{speed:>9}{memory:>12}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides (recipes/bench.yaml)")
    parser.add_argument("--side", default="trl,ours", help=f"comma-separated, of: {', '.join(SIDES)}")
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--answer-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape, short rows, 2 steps, on the CPU")
    parser.add_argument("--one-side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        args.shape, args.pairs, args.prompt_len, args.answer_len = "tiny", 2, 24, 8
        args.warmup, args.steps, args.device = 1, 2, "cpu"
    if args.one_side:
        return one_side(args)

    sides = args.side.split(",")
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        parser.error(f"unknown side(s) {unknown}; known: {', '.join(SIDES)}")
    argv = [
        f"--shape={args.shape}",
        f"--pairs={args.pairs}",
        f"--prompt-len={args.prompt_len}",
        f"--answer-len={args.answer_len}",
        f"--warmup={args.warmup}",
        f"--steps={args.steps}",
        f"--device={args.device}",
        *([f"--layers={args.layers}"] if args.layers else []),
        *args.overrides,
    ]
    results = []
    for side in sides:
        print(f"running {side} ...", file=sys.stderr, flush=True)
        results.append(run_in_subprocess(side, argv, args.timeout))
    print(f"DPO step, {args.shape}, {args.pairs} pairs x ({args.prompt_len} prompt + {args.answer_len} answer) tokens")
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
