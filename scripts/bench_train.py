"""QLoRA training step: qlora-kit against transformers + peft + bitsandbytes, Liger and Unsloth, in one run (CUDA).

Its length: every side (stock, Liger, Unsloth, ours) and the per-side subprocess plumbing are one
benchmark, so that all sides are measured by the same loop.

Every side gets a Llama-shape model with random weights in NF4 + double quantization,
LoRA on all seven projections, gradient checkpointing, bitsandbytes' PagedAdamW8bit,
bf16 autocast, and the same random tokens (every position labelled). Warm-up steps are
excluded; the timed steps run back to back (as in the Trainer), the GPU synchronized before the
first and after the last.

  stock:   LlamaForCausalLM with bitsandbytes Linear4bit (nf4, compress_statistics), non-reentrant
           checkpointing, sdpa, peft.get_peft_model(LoraConfig(target_modules="all-linear")),
           model(..., labels=...)
  liger:   stock after liger_kernel.transformers.apply_liger_kernel_to_llama(rope, rms_norm, swiglu,
           fused_linear_cross_entropy)
  unsloth: a random bf16 checkpoint of the shape written to disk, unsloth.FastLanguageModel.from_pretrained(
           load_in_4bit=True), get_peft_model(the seven projections, use_gradient_checkpointing="unsloth")
  ours:    recipes/bench.yaml + the side's and the command line's key=value overrides, built by
           qlora_kit.pipelines.builder.build_training_model (what train() builds), random NF4 weights

Each side runs in its own process (the script runs itself with --one-side and reads a JSON
line back): Liger and Unsloth patch transformers for the whole process, and a side's
allocations and compiled kernels cannot reach the next one. A side whose package is missing
is skipped with a message. --pythonpath SIDE=DIR puts DIR first on that side's PYTHONPATH
(e.g. Unsloth's packages, kept apart from the project's); the unsloth side runs offline.

--profile FILE writes, per side, how far the host was ahead of the GPU at each decoder layer's start
(an unprofiled step), then for two steps run back to back the kernels' busy time per stream, the compute
stream's idle gaps put down to the ops that launched the kernel after them, and torch.profiler's kernel table.

Model FLOPs per step: tokens * (4 * frozen params + 6 * LoRA params) for the linears
(forward + input gradient, plus weight gradients for LoRA) + causal attention
(forward and backward), without the checkpoint recompute; MFU divides by the bf16
matmul rate measured in the same run (in this process, before the sides run).

    python scripts/bench_train.py                                   # stock,ours at seq 2048 x 4, r=16
    python scripts/bench_train.py --side stock,liger,unsloth,ours --pythonpath unsloth=.devwheels/unsloth
    python scripts/bench_train.py --side ours --json out.json data.max_seq_len=8192 training.batch_size=1
    python scripts/bench_train.py --side stock,ours,ours-qat,plain-path training.uncheckpointed_layers=8
    python scripts/bench_train.py --side ours,ours-fp8 --seeds 0,1,2 --same-batch --layers 4 --warmup 0 --steps 200
    python scripts/bench_train.py --side ours-offload --steps 1 --warmup 1 --memory-snapshot /tmp/mem \
        data.max_seq_len=131072 training.batch_size=1 training.mlp_chunk_tokens=auto   # what fills the peak
    python scripts/bench_train.py --dry-run --side stock,ours        # the plumbing, on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from qlora_kit.compat import enable_checkpointing
from qlora_kit.model.build import SHAPES, llama_config

# Our sides: recipe overrides on top of recipes/bench.yaml and the command line's.
OURS = {
    "ours": [],  # the defaults: on one CUDA GPU, offload_activations auto picks ours-ckpt-offload-kept's setting
    "ours-gpu-checkpoints": ["training.offload_activations=false"],
    "ours-offload": ["training.offload_activations=true", "training.offload_embeddings=true"],
    "ours-ckpt-offload": ["training.offload_activations=true"],
    "ours-ckpt-offload-attn": ["training.offload_activations=true", "training.recompute_attention=false"],
    "ours-ckpt-offload-kept": [
        "training.offload_activations=true",
        "training.recompute_attention=false",
        "training.recompute_projections=false",
    ],
    "ours-fp8": ["training.fp8_base_matmul=true"],
    "ours-fp8-offload": ["training.fp8_base_matmul=true", "training.offload_activations=true"],
    "ours-fp8-backward": ["training.fp8_base_matmul=backward"],
    "ours-fp8-backward-offload": ["training.fp8_base_matmul=backward", "training.offload_activations=true"],
    "ours-qat": ["qat.enabled=true", "qat.group_size=128"],
    "plain-path": ["training.fused_kernels=false"],
}
PEERS = ("stock", "liger", "unsloth")
SIDES = (*PEERS, *OURS)
# The package each peer needs beyond the project's, for the skip message.
PEER_PACKAGES = {"stock": "bitsandbytes", "liger": "liger-kernel", "unsloth": "unsloth"}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# --shape tiny: a two-layer model for --dry-run, the subprocess plumbing on a CPU.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TINY_VOCAB = 256
DRY_RUN = ["data.max_seq_len=32", "training.batch_size=2"]
RESULT = "bench_train side result: "  # the prefix of the one stdout line a side's process answers on


class SideSkipped(Exception):
    """The side's package is missing (or does not import): nothing to measure."""


def model_config(shape: str, layers: int | None):
    overrides = {"num_hidden_layers": layers} if layers else {}
    if shape == "tiny":
        return llama_config("llama-3-8b", **{**TINY, "vocab_size": TINY_VOCAB, **overrides})
    return llama_config(shape, **overrides)


def matmul_tflops(device: torch.device) -> float:
    """The bf16 matmul rate of ``device`` (the denominator of MFU)."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# The peers' models.


def _random_linear_weights_to_nf4(model, device: torch.device) -> None:
    """Replace every decoder-layer nn.Linear by a bitsandbytes Linear4bit holding random N(0, 0.02) weights."""
    import bitsandbytes as bnb

    g = torch.Generator(device).manual_seed(0)
    for layer in model.model.layers:
        for name, m in list(layer.named_modules()):
            if isinstance(m, torch.nn.Linear):
                w = torch.empty(m.out_features, m.in_features, device=device, dtype=torch.bfloat16)
                w.normal_(0, 0.02, generator=g)
                q = bnb.nn.Linear4bit(
                    m.in_features,
                    m.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4").to(
                    device
                )
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, q)
                del w


def build_stock(config, recipe, device: torch.device):
    """transformers + peft + bitsandbytes (the liger side calls this after patching transformers)."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    _random_linear_weights_to_nf4(model, device)
    for name, p in list(model.named_parameters()):
        if p.device.type == "meta":
            value = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape) * 0.02
            module, _, attr = name.rpartition(".")
            setattr(
                model.get_submodule(module),
                attr,
                torch.nn.Parameter(value.to(device, torch.bfloat16), requires_grad=False),
            )
    model.tie_weights()
    model.model.rotary_emb.to(device)
    model.config.use_cache = False
    if recipe.training.gradient_checkpointing:
        enable_checkpointing(model)
    lora = recipe.lora
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    model.train()
    return model


def build_liger(config, recipe, device: torch.device):
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as e:
        raise SideSkipped(f"liger-kernel does not import ({e}); pip install liger-kernel") from e
    # Patches transformers' Llama modules and LlamaForCausalLM.forward (this process only).
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    return build_stock(config, recipe, device)


def write_random_checkpoint(config, path: Path, device: torch.device) -> None:
    """A bf16 Llama checkpoint of ``config``'s shape with random weights (norms ones, the rest
    N(0, 0.02)), in safetensors shards, and a tokenizer over a trivial vocabulary."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    config = type(config).from_dict(
        {**config.to_dict(), "unk_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    )
    config.dtype = torch.bfloat16
    config.architectures = ["LlamaForCausalLM"]  # what a saved model's config names
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    # Shards of about 4 GiB, each generated and written before the next (host memory: one shard).
    shards, size = [[]], 0
    for name, shape in shapes.items():
        if size >= 4 * 2**30:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += 2 * shape.numel()
    g = torch.Generator(device).manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                t = torch.empty(shapes[name], device=device, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
                tensors[name] = t.cpu()
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(path)

    vocab = {token: i for i, token in enumerate(specials + [f"t{i}" for i in range(config.vocab_size - len(specials))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(path)


def _checkpoint_dir(config) -> Path:
    """A temporary folder for the random checkpoint: in RAM (/dev/shm) when it has room for it twice."""
    c = config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    bf16_bytes = 2 * (c.num_hidden_layers * layer + 2 * c.vocab_size * c.hidden_size)
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and shutil.disk_usage(shm).free > 2 * bf16_bytes else None
    return Path(tempfile.mkdtemp(prefix="bench-train-unsloth-", dir=root))


def build_unsloth(config, recipe, device: torch.device, seq: int):
    try:
        import unsloth  # noqa: F401  (whether it imports; one_side imported it before transformers)
    except Exception as e:  # missing, or no GPU, or versions it refuses: its own message says which
        raise SideSkipped(f"unsloth does not import ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    path = _checkpoint_dir(config)
    try:
        write_random_checkpoint(config, path, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # the checkpoint's writing is not the side's memory
        return load_unsloth(path, recipe, seq)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def load_unsloth(path: Path, recipe, seq: int):
    """Unsloth's 4-bit model of the checkpoint at ``path`` with LoRA as ``recipe`` says, in training mode
    (``use_gradient_checkpointing="unsloth"``); the caller has imported unsloth before transformers."""
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(path),
        max_seq_length=seq,
        dtype=torch.bfloat16,
        load_in_4bit=True,
        fix_tokenizer=False,  # a stand-in tokenizer: nothing to fix
    )
    lora = recipe.lora
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=PROJECTIONS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=recipe.training.seed,
        max_seq_length=seq,
    )
    model.train()
    return model


# One side, in its own process.


def run_side(side: str, config, args, device: torch.device) -> dict:
    from bench_common import bench_recipe

    from qlora_kit.model.logprobs import find_labelled_positions

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    recipe = bench_recipe([*args.overrides, *OURS.get(side, [])])
    batch, seq = recipe.training.batch_size, recipe.data.max_seq_len
    if side in PEERS:
        if side == "stock":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as e:
                raise SideSkipped(f"bitsandbytes does not import ({e})") from e
            model = build_stock(config, recipe, device)
        elif side == "liger":
            model = build_liger(config, recipe, device)
        else:
            if importlib.util.find_spec("unsloth") is None:
                raise SideSkipped("unsloth is not installed (pip install unsloth, or --pythonpath unsloth=DIR)")
            model = build_unsloth(config, recipe, device, seq)
        params = [p for p in model.parameters() if p.requires_grad]
        if cuda:
            import bitsandbytes as bnb

            optimizer = bnb.optim.PagedAdamW8bit(params, lr=recipe.training.learning_rate)
        else:  # the CPU dry run: bitsandbytes' paged optimizers need CUDA
            optimizer = torch.optim.AdamW(params, lr=recipe.training.learning_rate)

        def step_loss(ids, positions, model=model):
            return model(input_ids=ids, labels=ids).loss

    else:
        from bench_common import build_ours, make_optimizer

        built = build_ours(recipe, config, device=device, total_steps=args.warmup + args.steps)
        model = built.model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(built, recipe)

        def step_loss(ids, positions, model=model):
            return model(input_ids=ids, labels=ids, labelled_positions=positions)["loss"]

    weights_bytes = torch.cuda.memory_allocated() if cuda else None
    lora_params = sum(p.numel() for p in params)
    g = torch.Generator(device).manual_seed(1)
    # Each batch with what the data collator adds to it for ours: the labelled positions, found off the GPU's path.
    batches = [
        (ids, find_labelled_positions(ids))
        for ids in (
            torch.randint(0, config.vocab_size, (batch, seq), device=device, generator=g)
            for _ in range(1 if args.same_batch else args.warmup + args.steps)
        )
    ]
    batches = batches * (args.warmup + args.steps) if args.same_batch else batches

    def train_step(ids, positions):
        # bf16 autocast on the GPU; the CPU dry run stays in fp32 (the CPU recipe's compute dtype).
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = step_loss(ids, positions)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses = []
    for ids, positions in batches[: args.warmup]:
        losses.append(train_step(ids, positions).item())
    # The timed steps run back to back as the Trainer runs them: a side whose step never waits for
    # the GPU queues the next step while this one runs.
    _sync(device)
    start = time.perf_counter()
    timed = [train_step(ids, positions) for ids, positions in batches[args.warmup :]]
    _sync(device)
    step = (time.perf_counter() - start) / len(timed)
    losses += [loss.item() for loss in timed]
    if args.profile:
        lead = host_lead(model, train_step, batches[-1]) if cuda else "host lead: CUDA only"
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        # Two steps back to back, as they run in training: the second starts with the first still queued.
        with torch.profiler.profile(activities=activities) as prof:
            for step_batch in batches[-2:]:
                train_step(*step_batch)
            _sync(device)
        from bench_common import gpu_timeline, idle_report

        events = prof.events()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=80, max_name_column_width=90)
        with open(f"{args.profile}.{side}.txt", "w") as f:
            f.write(f"{lead}\n{gpu_timeline(events)}\n{idle_report(events)}\n\n{table}")
    if args.memory_snapshot:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        train_step(*batches[-1])
        _sync(device)
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        with open(f"{args.memory_snapshot}.{side}.txt", "w") as f:
            f.write(peak_report(snapshot))
    return {
        "side": side,
        "pid": os.getpid(),
        "step_s": step,
        "tokens_per_s": batch * seq / step,
        "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None,
        "weights_bytes": weights_bytes,
        "lora_params": lora_params,
        "batch": batch,
        "seq": seq,
        "losses": losses,
    }


def host_lead(model, train_step, batch) -> str:
    """Lines on how far ahead of the GPU the host was when each decoder layer started (forward and
    recompute) in one unprofiled step: near 0, the GPU was waiting for the host's launches there."""
    from qlora_kit.compat import in_backward

    marks = []

    def mark(phase: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((phase, time.perf_counter(), event))

    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    hooks = [
        m.register_forward_pre_hook(lambda m, a: mark("recompute" if in_backward() else "forward")) for m in layers
    ]
    torch.cuda.synchronize()
    mark("start")
    try:
        train_step(*batch)
    finally:
        for h in hooks:
            h.remove()
    torch.cuda.synchronize()
    _, host0, event0 = marks[0]
    leads: dict[str, list[float]] = {}
    for phase, host, event in marks[1:]:
        leads.setdefault(phase, []).append(event0.elapsed_time(event) - (host - host0) * 1e3)
    lines = ["host ahead of the GPU at each layer's start (ms): phase, layers, min / median / max"]
    for phase, values in leads.items():
        values.sort()
        lines.append(
            f"  {phase:9s} {len(values):3d}  {values[0]:8.2f} {values[len(values) // 2]:8.2f} {values[-1]:8.2f}"
        )
    return "\n".join(lines)


def one_side(args) -> None:
    """The child: measure one side and print its result as one JSON line (a skip or an error too)."""
    side = args.one_side
    if side == "unsloth":
        # Unsloth patches transformers and peft when it is imported: before anything imports them.
        try:
            import unsloth  # noqa: F401
        except Exception:
            pass  # build_unsloth reports why
    device = torch.device(args.device)
    if args.cap_gb and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.cap_gb * 1e9 / torch.cuda.get_device_properties(0).total_memory)
        )
    try:
        result = run_side(side, model_config(args.shape, args.layers), args, device)
    except SideSkipped as e:
        result = {"side": side, "skipped": str(e)}
    except torch.OutOfMemoryError as e:
        result = {"side": side, "error": f"out of memory: {str(e).splitlines()[0]}"}
    print(RESULT + json.dumps(result), flush=True)


# The parent: one process per side, then the tables.


def side_environment(side: str, pythonpath: dict[str, str]) -> dict[str, str]:
    """The environment of a side's process: its PYTHONPATH entries first; Unsloth offline and quiet."""
    env = dict(os.environ)
    if side in pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath[side], env.get("PYTHONPATH")) if p)
    if side == "unsloth":
        env.update(HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    return env


def run_in_subprocess(side: str, argv: list[str], pythonpath: dict[str, str], timeout: float) -> dict:
    """Run this script with ``--one-side side``; its other output goes to stderr, prefixed with the side."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-side", side, *argv]
    # Unsloth writes its compiled modules into the working directory: a temporary one, removed after.
    workdir = tempfile.mkdtemp(prefix=f"bench-train-{side}-")
    result, tail, timed_out = None, [], threading.Event()
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=side_environment(side, pythonpath),
            cwd=workdir,
        )

        def kill() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                if line.startswith(RESULT):
                    result = json.loads(line[len(RESULT) :])
                else:
                    sys.stderr.write(f"[{side}] {line}")
                    tail = [*tail, line.rstrip()][-5:]
            code = proc.wait()
        finally:
            watchdog.cancel()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if result is None:
        why = f"timed out after {timeout:.0f} s" if timed_out.is_set() else f"exit code {code}"
        last = next((line for line in reversed(tail) if line.strip()), "")
        result = {"side": side, "error": f"{why}: {last[:300]}"}
    return result


def model_flops_per_step(config, lora_params: int, batch: int, seq: int) -> float:
    c = config
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    linear = c.num_hidden_layers * (
        c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    )
    frozen = linear + c.vocab_size * c.hidden_size  # lm_head
    tokens = batch * seq
    # Causal attention: QK^T and PV, half the square, forward + 2x backward.
    attention = 3 * 2 * 2 * c.num_hidden_layers * batch * seq * seq * c.hidden_size / 2
    return tokens * (4 * frozen + 6 * lora_params) + attention


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted([*SHAPES, "tiny"]))
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--side",
        default="stock,ours",
        help=f"comma-separated: {', '.join(PEERS)}, {', '.join(OURS)} (each ours side adds its recipe keys: "
        + "; ".join(f"{k}: {' '.join(v) or 'none'}" for k, v in OURS.items())
        + ")",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the plumbing only")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"--device cpu --shape tiny --steps 2 --warmup 1 {' '.join(DRY_RUN)} (overrides given still apply)",
    )
    parser.add_argument(
        "--pythonpath",
        action="append",
        default=[],
        metavar="SIDE=DIR",
        help="put DIR (one or several, separated by os.pathsep) first on SIDE's PYTHONPATH (repeatable), "
        "e.g. unsloth=.devwheels/unsloth",
    )
    parser.add_argument("--side-timeout", type=float, default=600, help="seconds a side may take (default 600)")
    parser.add_argument("--budget", type=float, help="seconds all sides together may take (a side gets what is left)")
    parser.add_argument("--cap-gb", type=float, help="cap each side's GPU memory (GB), as for the long-context test")
    parser.add_argument(
        "--same-batch", action="store_true", help="train on one batch throughout (a loss curve that falls)"
    )
    parser.add_argument(
        "--seeds",
        help="comma-separated training.seed values: each ours side runs once per seed (SIDE@SEED), and the "
        "loss curves are compared seed to seed (bf16's run-to-run spread) and side to ours at the same seed",
    )
    parser.add_argument(
        "--profile",
        help="write the host lead per layer, one step's kernel busy time per stream, its idle gaps and its "
        "torch.profiler table to FILE.SIDE.txt",
    )
    parser.add_argument(
        "--memory-snapshot",
        help="CUDA: record the allocator's history over one more step and write what is alive at its peak, "
        "by the line that allocated it, to FILE.SIDE.txt",
    )
    parser.add_argument("--json")
    parser.add_argument("--one-side", choices=SIDES, help=argparse.SUPPRESS)  # a side's own process
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe keys over recipes/bench.yaml for every side, e.g. data.max_seq_len=8192 "
        "training.batch_size=1 lora.r=64 training.uncheckpointed_layers=8",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.shape, args.steps, args.warmup = "cpu", "tiny", 2, 1
        args.overrides = [*DRY_RUN, *args.overrides]
    args.sides = args.side.split(",")
    unknown = set(args.sides) - set(SIDES)
    if unknown:
        parser.error(f"unknown --side {sorted(unknown)}; known: {', '.join(SIDES)}")
    bad = [p for p in args.pythonpath if p.partition("=")[0] not in SIDES or not p.partition("=")[2]]
    if bad:
        parser.error(f"--pythonpath takes SIDE=DIR with SIDE one of {', '.join(SIDES)}, got {bad}")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: --device cpu (or --dry-run) runs the plumbing on the CPU")
    if args.memory_snapshot and args.device != "cuda":
        parser.error("--memory-snapshot records the CUDA allocator: it needs --device cuda")
    return args


def child_argv(args) -> list[str]:
    """What a side's process is told: the measurement's arguments, not the parent's orchestration."""
    argv = ["--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    if args.cap_gb:
        argv += ["--cap-gb", str(args.cap_gb)]
    if args.same_batch:
        argv.append("--same-batch")
    if args.profile:
        argv += ["--profile", args.profile]
    if args.memory_snapshot:
        argv += ["--memory-snapshot", args.memory_snapshot]
    return [*argv, *args.overrides]


def print_tables(results: dict, config) -> None:
    gib = 1 / 2**30
    sides = results["sides"]
    print(
        f"\n{results['shape']} ({config.num_hidden_layers} layers), seq {results['seq']}, batch {results['batch']}, "
        f"LoRA r={results['rank']}, {' '.join(results['overrides']) or 'recipes/bench.yaml'}, "
        f"{results['device']}, bf16 matmul {results['matmul_tflops']:.{0 if results['matmul_tflops'] >= 10 else 2}f} "
        "TFLOP/s; each side in its own process"
    )
    w = max(14, *(len(s) + 1 for s in sides))
    print(f"{'':{w}}{'s/step':>9}{'tokens/s':>10}{'peak GiB':>10}{'MFU':>7}   losses")
    for side, r in sides.items():
        if "skipped" in r or "error" in r:
            print(f"{side:{w}}{'skipped: ' + r['skipped'] if 'skipped' in r else 'error: ' + r['error']}")
            continue
        peak = f"{r['peak_allocated'] * gib:10.2f}" if r["peak_allocated"] is not None else f"{'n/a':>10}"
        print(
            f"{side:{w}}{r['step_s']:9.3f}{r['tokens_per_s']:10.0f}{peak}{r['mfu']:7.1%}   "
            + " ".join(f"{x:.3f}" for x in r["losses"][:3])
        )
    measured = [s for s, r in sides.items() if "tokens_per_s" in r]
    if len(measured) > 1:
        for title, key in (("tokens/s", "tokens_per_s"), ("peak memory", "peak_allocated")):
            if any(sides[s][key] is None for s in measured):
                continue
            w = max(14, *(len(s) + 1 for s in measured))
            print(f"\n{title}, row / column:")
            print(f"{'':{w}}" + "".join(f"{s:>{w}}" for s in measured))
            for a in measured:
                print(f"{a:{w}}" + "".join(f"{sides[a][key] / sides[b][key]:{w - 1}.2f}x" for b in measured))
    print_curve_differences(sides, measured)
    if "tokens_per_s" in sides.get("ours", {}) and "tokens_per_s" in sides.get("ours-qat", {}):
        print(f"QAT step-time overhead: {sides['ours-qat']['step_s'] / sides['ours']['step_s'] - 1:+.1%}")


def peak_report(snapshot: dict, rows: int = 25) -> str:
    """The blocks alive at the step's allocation peak, grouped by the line of our or transformers' code
    that allocated them (from a ``torch.cuda.memory._snapshot()`` taken with history recorded)."""
    live, current, peak, at_peak = {}, 0, 0, {}
    for action in (a for trace in snapshot["device_traces"] for a in trace):
        if action["action"] == "alloc":
            live[action["addr"]] = action
            current += action["size"]
        elif action["action"] == "free_completed" and action["addr"] in live:
            current -= live.pop(action["addr"])["size"]
        else:
            continue
        if current > peak:
            peak, at_peak = current, dict(live)

    def origin(action: dict) -> str:
        frames = [
            f for f in action.get("frames", []) if "qlora_kit" in f["filename"] or "transformers" in f["filename"]
        ]
        f = frames[0] if frames else (action.get("frames") or [{"filename": "?", "line": 0, "name": "?"}])[0]
        return f"{Path(f['filename']).name}:{f['line']} {f['name']}"

    groups: dict[str, list[int]] = {}
    for action in at_peak.values():
        groups.setdefault(origin(action), []).append(action["size"])
    lines = [
        f"allocated during the step, at its peak: {peak / 2**30:.2f} GiB in {len(at_peak)} blocks (grouped by origin)"
    ]
    for name, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        lines.append(f"{sum(sizes) / 2**30:8.3f} GiB {len(sizes):5d} blocks  {name}")
    return "\n".join(lines) + "\n"


def _curve_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    diffs = [abs(x - y) for x, y in zip(a, b)]
    return max(diffs), sum(diffs) / len(diffs)


def print_curve_differences(sides: dict, measured: list[str]) -> None:
    """Every ours-* side's loss curve against ours' at the same seed, and ours' against itself over seeds.

    With --same-batch the plain path against ours is bf16's kernel noise (the same math, other kernels
    and summation orders), and ours over --seeds is its run-to-run spread (the adapters' initialisation):
    the yardsticks for a lever that changes the numbers (FP8).
    """
    runs = {}  # (side, seed) -> losses
    for label in measured:
        side, _, seed = label.partition("@")
        runs[side, seed] = sides[label]["losses"]
    seeds = sorted({seed for side, seed in runs if side == "ours"})
    lines = []
    for a, b in itertools.combinations(seeds, 2):
        lines.append((f"ours@{a} vs ours@{b}", *_curve_difference(runs["ours", a], runs["ours", b])))
    for (side, seed), curve in runs.items():
        if side in OURS and side not in ("ours", "ours-qat") and ("ours", seed) in runs:
            name = f"{side}@{seed} vs ours@{seed}" if seed else f"{side} vs ours"
            lines.append((name, *_curve_difference(curve, runs["ours", seed])))
    for name, worst, mean in lines:
        steps = len(next(iter(runs.values())))
        print(f"loss curve over {steps} steps, {name}: max |difference| {worst:.4f}, mean {mean:.4f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one_side:
        one_side(args)
        return 0
    from bench_common import bench_recipe

    config = model_config(args.shape, args.layers)
    recipe = bench_recipe(args.overrides)  # checked before any side starts
    device = torch.device(args.device)
    peak_tflops = matmul_tflops(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "shape": args.shape,
        "layers": config.num_hidden_layers,
        "seq": recipe.data.max_seq_len,
        "batch": recipe.training.batch_size,
        "rank": recipe.lora.r,
        "overrides": args.overrides,
        "matmul_tflops": peak_tflops,
        "pid": os.getpid(),
        "sides": {},
    }
    pythonpath = dict(p.partition("=")[::2] for p in args.pythonpath)
    # Absolute: a side's process runs in a temporary working directory.
    pythonpath = {
        side: os.pathsep.join(str(Path(d).resolve()) for d in dirs.split(os.pathsep) if d)
        for side, dirs in pythonpath.items()
    }
    deadline = time.monotonic() + (args.budget or math.inf)
    runs = [
        (f"{side}@{seed}", side, [f"training.seed={seed}"]) if args.seeds and side in OURS else (side, side, [])
        for side in args.sides
        for seed in (args.seeds if args.seeds and side in OURS else [None])
    ]
    for label, side, keys in runs:
        print(f"bench_train: {label} ...", file=sys.stderr, flush=True)
        timeout = min(args.side_timeout, deadline - time.monotonic())
        if timeout < 1:
            r = {"side": side, "error": f"not run: the --budget of {args.budget:.0f} s was spent"}
        else:
            r = run_in_subprocess(side, [*child_argv(args), *keys], pythonpath, timeout)
        if "tokens_per_s" in r:
            flops = model_flops_per_step(config, r["lora_params"], r["batch"], r["seq"])
            r["mfu"] = flops / r["step_s"] / (peak_tflops * 1e12)
        elif "skipped" in r:
            print(f"bench_train: {side} skipped: {r['skipped']}", file=sys.stderr, flush=True)
        results["sides"][label] = r
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print_tables(results, config)
    return 0 if all("error" not in r for r in results["sides"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
