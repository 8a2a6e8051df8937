"""The longest sequence that trains under a GPU memory cap: qlora-kit, the stock stack and Unsloth, in one run (CUDA).

Every side trains a Llama shape (--shape) at batch 1 with LoRA r=16 on all linears, bf16
autocast and the same random tokens (every position labelled), like scripts/bench_train.py.
A trial trains --warmup + --steps optimizer steps (3) at one sequence length in a fresh
subprocess under --cap-gb (so a failed allocation's fragmentation and a side's patches do not
leak into the next trial); it fits when every step runs and every loss is finite. The search
starts at --start, halves while that fails, doubles while it fits (up to --max-seq), then
bisects between the longest fit and the shortest failure on multiples of --step. A trial at
--speed-seq (65,536) gives every side's tokens/s there, unless the search already ran it.

  ours, ours-offload, ...: recipes/bench.yaml + the side's keys + the command line's key=value
      overrides (which win), built by qlora_kit.pipelines.builder.build_training_model
  ours-long: + offloaded checkpoints and embeddings, and the tiled MLP (training.mlp_chunk_tokens=auto)
  ours-long-attn: ours-long + the attention output kept with the checkpoint, not recomputed
      (training.recompute_attention: false; as much CPU memory again as the checkpoints)
  ours-long-fp8: ours-long + the base GEMMs in e4m3 (training.fp8_base_matmul: true)
  ours-long-fp8-backward: ours-long + the backward pass's base GEMMs in e4m3 (training.fp8_base_matmul: backward)
  stock:   transformers + peft + bitsandbytes (scripts/bench_train.py's build_stock)
  unsloth: scripts/bench_train.py's load_unsloth (FastLanguageModel, 4-bit, use_gradient_checkpointing="unsloth",
      LoRA as recipes/bench.yaml says) on a random bf16 checkpoint of the shape written once
      (--unsloth-checkpoint); skipped when the package is missing

    python scripts/bench_context.py --cap-gb 24 --side ours-long,unsloth,stock
    python scripts/bench_context.py --cap-gb 24 --side ours-long,unsloth,stock --start stock=8192,unsloth=65536,131072 \
        --pythonpath unsloth=.devwheels/unsloth
    python scripts/bench_context.py --cap-gb 80 --side ours-long --start 131072 --step 16384
    python scripts/bench_context.py --cap-gb 24 --side ours-long --json ctx.json --resume   # after an interruption
    python scripts/bench_context.py --dry-run   # the search on the CPU: a tiny model, a simulated cap

--start and --max-seq take one length for every side, or SIDE=LENGTH entries (a bare length: the
others), so that each side's search starts near its answer.

--json writes every trial as it completes; --resume reuses the trials of an earlier run with the
same settings (those that crashed run again). A trial that crashes (a host out of memory, a
library error) counts as not fitting and its error is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Our sides: recipe keys over recipes/bench.yaml (the command line's overrides come after them).
OURS = {
    "ours": [],
    "ours-offload": ["training.offload_activations=true", "training.offload_embeddings=true"],
    "ours-long": [
        "training.offload_activations=true",
        "training.offload_embeddings=true",
        "training.mlp_chunk_tokens=auto",
    ],
}
OURS["ours-long-attn"] = [*OURS["ours-long"], "training.recompute_attention=false"]
OURS["ours-long-fp8"] = [*OURS["ours-long"], "training.fp8_base_matmul=true"]
OURS["ours-long-fp8-backward"] = [*OURS["ours-long"], "training.fp8_base_matmul=backward"]
PEERS = ("stock", "unsloth")
RESULT = "RESULT "  # the prefix of a trial's result line on its stdout
CRASHED = "the trial exited with status"  # the error of a trial that ended without a result
# --dry-run: a tiny untied Llama on the CPU, and a cap that "fits" up to this many tokens.
DRY_RUN_SHAPE = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    tie_word_embeddings=False,
)
DRY_RUN_FITS = 352


# The search.


def longest_fit(fits: Callable[[int], bool], step: int, start: int, max_seq: int) -> int:
    """The longest multiple of ``step`` in [step, max_seq] for which ``fits`` holds (0: none), assuming
    that what fits at one length fits at every shorter one.

    From ``start`` (rounded to a multiple of ``step``): halve while it does not fit, double while it
    fits, then bisect between the longest fit and the shortest failure.
    """
    seq = max(step, min(max_seq, start) // step * step)
    good, bad = 0, None
    while good == 0 and bad != step:
        if fits(seq):
            good = seq
        else:
            bad = seq
            seq = max(step, seq // 2 // step * step)
    while good and bad is None and good < max_seq:
        seq = min(max_seq // step * step, 2 * good)
        if seq == good:
            break
        if fits(seq):
            good = seq
        else:
            bad = seq
    while bad is not None and bad - good > step:
        seq = (good + bad) // 2 // step * step
        if fits(seq):
            good = seq
        else:
            bad = seq
    return good


# One trial (in its own process).


def model_config(args, seq: int):
    from transformers import LlamaConfig

    from qlora_kit.model.build import llama_config

    if args.dry_run:
        return LlamaConfig(**DRY_RUN_SHAPE, max_position_embeddings=seq)
    layers = {"num_hidden_layers": args.layers} if args.layers else {}
    return llama_config(args.shape, **layers, max_position_embeddings=max(seq, 8192))


def build_side(side: str, seq: int, args, config, device):
    """(step_loss(ids), optimizer) of one side, its model on ``device``."""
    from bench_common import bench_recipe, build_ours, make_optimizer

    # The trial's length and batch come last: they are what the search varies.
    keys = [*OURS.get(side, []), *args.overrides, f"data.max_seq_len={seq}", "training.batch_size=1"]
    recipe = bench_recipe(keys)
    if side in PEERS:
        import bitsandbytes as bnb
        from bench_train import build_stock, load_unsloth

        if side == "stock":
            model = build_stock(config, recipe, device)
        else:  # on the random checkpoint written once for every trial
            model = load_unsloth(Path(args.unsloth_checkpoint), recipe, seq)
        params = [p for p in model.parameters() if p.requires_grad]
        return (lambda ids: model(input_ids=ids, labels=ids).loss), bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    built = build_ours(recipe, config, device=device, total_steps=args.warmup + args.steps)
    model = built.model

    def step_loss(ids):
        return model(input_ids=ids, labels=ids)["loss"]

    return step_loss, make_optimizer(built, recipe)


def run_trial(side: str, seq: int, args) -> dict:
    """Train the side at ``seq`` tokens, batch 1; the measurement, or why it does not fit."""
    if side == "unsloth":
        import unsloth  # noqa: F401  (before transformers)
    import torch

    cuda = not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 1e9 / total))
    config = model_config(args, seq)
    try:
        if args.dry_run and seq > DRY_RUN_FITS:
            raise torch.OutOfMemoryError(f"simulated: the dry run's cap fits {DRY_RUN_FITS} tokens")
        step_loss, optimizer = build_side(side, seq, args, config, device)
        g = torch.Generator(device).manual_seed(1)
        losses, times = [], []
        for i in range(args.warmup + args.steps):
            ids = torch.randint(0, config.vocab_size, (1, seq), device=device, generator=g)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = step_loss(ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())  # synchronizes
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as e:
        return {"fits": False, "error": f"out of memory: {str(e).splitlines()[0]}"}
    step = sorted(times)[len(times) // 2]
    fits = all(math.isfinite(x) for x in losses)
    result = {"fits": fits, "tokens_per_s": seq / step, "losses": losses}
    if not fits:
        result["error"] = f"loss not finite: {losses}"
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:  # the dry run: the process's peak resident memory
        import resource

        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def write_unsloth_checkpoint(args) -> None:
    """A random bf16 checkpoint of the shape with a stand-in tokenizer (bench_train's), for FastLanguageModel."""
    import torch
    from bench_train import write_random_checkpoint

    path = Path(args.unsloth_checkpoint)
    path.mkdir(parents=True, exist_ok=True)
    # The parent passes Unsloth's longest length: the checkpoint's max_position_embeddings.
    write_random_checkpoint(model_config(args, int(args.max_seq)), path, torch.device("cuda"))
    (path / "complete").touch()


# The parent: one subprocess per trial.


def trial_in_subprocess(side: str, seq: int, args) -> dict:
    from bench_train import side_environment

    command = [sys.executable, __file__, "--trial", side, str(seq), *_forwarded(args)]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=args.trial_timeout,
            env=side_environment(side, args.pythonpath),
        )
    except subprocess.TimeoutExpired:
        return {"fits": False, "error": f"no result within --trial-timeout {args.trial_timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        if done.returncode == -signal.SIGKILL:  # the kernel's OOM killer leaves no message of its own
            tail = ["killed (SIGKILL): most likely the host ran out of CPU memory", *tail]
        return {"fits": False, "error": f"{CRASHED} {done.returncode}: " + " | ".join(tail)}
    result = json.loads(lines[-1][len(RESULT) :])
    result["trial_s"] = time.perf_counter() - start
    return result


def _forwarded(args) -> list[str]:
    """The command-line options a trial needs, as the parent got them."""
    out = ["--shape", args.shape, "--rank", str(args.rank), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.layers:
        out += ["--layers", str(args.layers)]
    if args.cap_gb:
        out += ["--cap-gb", str(args.cap_gb)]
    if args.dry_run:
        out.append("--dry-run")
    out += ["--unsloth-checkpoint", str(args.unsloth_checkpoint)]
    return out + list(args.overrides)


def per_side(text: str, sides: list[str], default: int, option: str) -> dict[str, int]:
    """``"N"`` or ``"side=N,...,N"`` as one length per side (a bare N: the sides not named; else ``default``)."""
    values, rest = {}, default
    for item in text.split(","):
        side, _, value = item.rpartition("=")
        if side and side not in sides:
            raise ValueError(f"{option}: {side!r} is not one of the sides run ({', '.join(sides)})")
        try:
            length = int(value)
        except ValueError:
            raise ValueError(f"{option}: {value!r} is not a number of tokens") from None
        if length <= 0:
            raise ValueError(f"{option}: {length} is not a positive number of tokens")
        if side:
            values[side] = length
        else:
            rest = length
    return {side: values.get(side, rest) for side in sides}


def settings(args) -> dict:
    """What makes two runs' trials comparable (--resume refuses a file written with others)."""
    keys = ("shape", "layers", "rank", "cap_gb", "warmup", "steps", "dry_run", "overrides")
    return {k: getattr(args, k) for k in keys}


def search(args) -> dict:
    results = {"settings": settings(args), "trials": {}, "sides": {}}
    if args.resume:
        if not args.json or not Path(args.json).is_file():
            raise SystemExit("--resume needs the --json file of an earlier run")
        earlier = json.loads(Path(args.json).read_text())
        if earlier.get("settings") != results["settings"]:
            raise SystemExit(
                f"--resume: {args.json} was written with other settings: {earlier.get('settings')}, "
                f"not {results['settings']}"
            )
        # A trial that crashed (a library error, a host out of memory) measured nothing: it runs again.
        results["trials"] = {
            side: {seq: t for seq, t in trials.items() if not t.get("error", "").startswith(CRASHED)}
            for side, trials in earlier["trials"].items()
        }

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    for side in args.sides:
        skipped = prepare(side, args)
        if skipped:
            print(f"{side}: skipped ({skipped})", flush=True)
            results["sides"][side] = {"skipped": skipped}
            continue
        trials = results["trials"].setdefault(side, {})

        def fits(seq: int, side=side, trials=trials) -> bool:
            if str(seq) not in trials:
                trials[str(seq)] = trial_in_subprocess(side, seq, args)
                save()
                print(f"{side} seq {seq}: {_describe(trials[str(seq)])}", flush=True)
            return trials[str(seq)]["fits"]

        longest = longest_fit(fits, args.step, args.start[side], args.max_seq[side])
        if 0 < args.speed_seq <= longest:
            fits(args.speed_seq)
        results["sides"][side] = {"longest": longest}
        save()
    return results


def prepare(side: str, args) -> str | None:
    """Why ``side`` is skipped, or None (its random checkpoint written first, for Unsloth)."""
    if args.dry_run and side in PEERS:
        return "the dry run trains our sides only: the peers need CUDA"
    if side == "unsloth":
        dirs = args.pythonpath.get(side, "").split(os.pathsep)
        if importlib.util.find_spec("unsloth") is None and not any((Path(d) / "unsloth").is_dir() for d in dirs if d):
            return "the unsloth package is not installed (pip install unsloth, or --pythonpath unsloth=DIR)"
        if not (Path(args.unsloth_checkpoint) / "complete").is_file():
            print(f"unsloth: writing a random {args.shape} checkpoint to {args.unsloth_checkpoint}", flush=True)
            command = [sys.executable, __file__, "--write-unsloth-checkpoint", *_forwarded(args)]
            command += ["--max-seq", str(args.max_seq[side])]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                return "writing its checkpoint failed: " + " | ".join(done.stderr.strip().splitlines()[-3:])
    return None


def _describe(trial: dict) -> str:
    if not trial["fits"]:
        return trial["error"]
    return f"fits, {trial['peak_gib']:.2f} GiB, {trial['tokens_per_s']:.0f} tokens/s"


def print_table(results: dict, args) -> None:
    cap = "no cap" if not args.cap_gb or args.dry_run else f"cap {args.cap_gb:g} GB"
    shape = "tiny (dry run)" if args.dry_run else args.shape
    print(f"\n{shape}, batch 1, LoRA r={args.rank}, {cap}, {' '.join(args.overrides) or 'recipes/bench.yaml'}")
    speed = f"tokens/s @{args.speed_seq}" if args.speed_seq else ""  # --speed-seq 0: no such column
    print(f"{'side':14}{'longest seq':>12}{'peak GiB':>10}{'tokens/s':>10}{speed:>18}".rstrip())
    for side, summary in results["sides"].items():
        if "skipped" in summary:
            print(f"{side:14}skipped: {summary['skipped']}")
            continue
        trials, longest = results["trials"][side], summary["longest"]
        at_speed = trials.get(str(args.speed_seq), {})
        speed_cell = ""
        if speed:
            speed_cell = f"{at_speed['tokens_per_s']:.0f}" if at_speed.get("fits") else "does not fit"
        if longest == 0:
            shortest = trials[min(trials, key=int)]
            print(f"{side:14}{'none':>12}{'':>10}{'':>10}{speed_cell:>18}   ({shortest['error']})")
            continue
        best = trials[str(longest)]
        print(f"{side:14}{longest:12d}{best['peak_gib']:10.2f}{best['tokens_per_s']:10.0f}{speed_cell:>18}".rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # No choices from qlora_kit here: a trial of Unsloth must import it before anything imports transformers.
    parser.add_argument("--shape", default="llama-3-8b", help="a shape of qlora_kit.model.build.SHAPES")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the peers (ours: lora.r, 16 in bench.yaml)")
    parser.add_argument(
        "--side", default="ours-long,stock,unsloth", help=f"comma-separated: {', '.join([*OURS, *PEERS])}"
    )
    parser.add_argument("--cap-gb", type=float, help="cap each trial's GPU memory (GB)")
    parser.add_argument("--step", type=int, default=8192, help="the search's resolution in tokens")
    parser.add_argument("--start", default="8192", help="the first length tried: N, or SIDE=N,... (see above)")
    parser.add_argument("--max-seq", default="262144", help="the longest length tried: N, or SIDE=N,...")
    parser.add_argument("--speed-seq", type=int, default=65536, help="tokens/s of every side at this length (0: off)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of a trial")
    parser.add_argument("--steps", type=int, default=2, help="timed steps of a trial (tokens/s: their median)")
    parser.add_argument("--trial-timeout", type=int, default=1800, help="seconds before a trial counts as failed")
    parser.add_argument("--unsloth-checkpoint", type=Path, help="its random checkpoint (default: in the temp dir)")
    parser.add_argument(
        "--pythonpath",
        action="append",
        default=[],
        metavar="SIDE=DIR",
        help="put DIR first on SIDE's PYTHONPATH (repeatable), e.g. unsloth=.devwheels/unsloth",
    )
    parser.add_argument("--json", help="write the trials here as they complete")
    parser.add_argument("--resume", action="store_true", help="reuse the trials in --json of an earlier run")
    parser.add_argument("--dry-run", action="store_true", help="the search on the CPU: tiny model, simulated cap")
    parser.add_argument("--trial", nargs=2, metavar=("SIDE", "SEQ"), help=argparse.SUPPRESS)
    parser.add_argument("--write-unsloth-checkpoint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe keys for our sides")
    args = parser.parse_args()
    if args.unsloth_checkpoint is None:
        args.unsloth_checkpoint = Path(tempfile.gettempdir()) / f"qlora-kit-bench-{args.shape}-random"
    if args.trial:
        side, seq = args.trial
        print(RESULT + json.dumps(run_trial(side, int(seq), args)), flush=True)
        return
    if args.write_unsloth_checkpoint:
        write_unsloth_checkpoint(args)
        return
    from qlora_kit.model.build import SHAPES

    if args.shape not in SHAPES:
        parser.error(f"unknown --shape {args.shape}; known: {', '.join(SHAPES)}")
    if args.dry_run:
        args.step, args.start, args.max_seq, args.speed_seq = 64, "64", "1024", 256
    args.sides = args.side.split(",")
    unknown = set(args.sides) - {*OURS, *PEERS}
    if unknown:
        parser.error(f"unknown --side {sorted(unknown)}; known: {', '.join([*OURS, *PEERS])}")
    bad = [p for p in args.pythonpath if p.partition("=")[0] not in {*OURS, *PEERS} or not p.partition("=")[2]]
    if bad:
        parser.error(f"--pythonpath takes SIDE=DIR with SIDE one of {', '.join([*OURS, *PEERS])}, got {bad}")
    args.pythonpath = {
        side: os.pathsep.join(str(Path(d).resolve()) for d in dirs.split(os.pathsep) if d)
        for side, dirs in (p.partition("=")[::2] for p in args.pythonpath)
    }
    try:
        args.start = per_side(args.start, args.sides, 8192, "--start")
        args.max_seq = per_side(args.max_seq, args.sides, 262144, "--max-seq")
    except ValueError as e:
        parser.error(str(e))
    if args.step <= 0 or min(args.max_seq.values()) < args.step:
        parser.error("--step must be positive, and every --max-seq at least --step")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("the search runs on CUDA; --dry-run runs its logic on the CPU")
    from bench_common import bench_recipe

    recipe = bench_recipe(args.overrides)  # a bad key fails here, not in every trial
    if recipe.lora.r != args.rank:
        parser.error(f"--rank {args.rank} (the peers' LoRA rank) and lora.r={recipe.lora.r} (ours) differ")
    print_table(search(args), args)


if __name__ == "__main__":
    main()
