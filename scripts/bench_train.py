"""QLoRA training step: qlora-kit against transformers + peft + bitsandbytes, in one run (CUDA).

Both sides get a Llama-shape model with random weights in NF4 + double quantization,
LoRA on all linear layers, non-reentrant gradient checkpointing, sdpa attention,
bitsandbytes' PagedAdamW8bit, bf16 autocast, and the same random tokens (every
position labelled). Warm-up steps are excluded; the timed steps are synchronized.

  stock: LlamaForCausalLM with bitsandbytes Linear4bit (nf4, compress_statistics),
         peft.get_peft_model(LoraConfig(target_modules="all-linear")), model(..., labels=...)
  ours:  qlora_kit.model.build (same shapes), add_lora, SFTModel (chunked loss)

Model FLOPs per step: tokens * (4 * frozen params + 6 * LoRA params) for the linears
(forward + input gradient, plus weight gradients for LoRA) + causal attention
(forward and backward), without the checkpoint recompute; MFU divides by the bf16
matmul rate measured in the same run.

    python scripts/bench_train.py --seq 2048 --batch 4 --rank 16
    python scripts/bench_train.py --seq 8192 --batch 1 --side ours --json out.json
    python scripts/bench_train.py --side stock,ours-unfused,ours,ours-qat
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from qlora_kit.model.build import SHAPES, build_random_quantized, llama_config


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def build_ours(
    config,
    rank: int,
    checkpointing: bool,
    fused: bool = True,
    qat: bool = False,
    offload: bool = False,
    uncheckpointed: int = 0,
    plain: bool = False,
):
    """Our stack; ``offload``: checkpoints and input embeddings in CPU memory (qlora_kit.model.offload);
    ``uncheckpointed``: the last layers keep their activations instead of recomputing them; ``plain``:
    the plain PyTorch path of training.fused_kernels=false (stock ops, plain LoRA autograd, full logits)."""
    from qlora_kit.model.adapters import add_lora, lora_modules
    from qlora_kit.model.fused import use_fused_ops
    from qlora_kit.model.sft import SFTModel
    from qlora_kit.modules.fake_quant import FakeQuantConfig
    from qlora_kit.modules.lora import enable_qat

    lm = build_random_quantized(config, "cuda", torch.bfloat16, progress=False)
    torch.manual_seed(0)  # the same LoRA initialisation on every side of ours
    add_lora(lm, rank, 2 * rank)
    if qat:
        enable_qat(lm, FakeQuantConfig("int", 4, 128, True))
    if fused and not plain:
        use_fused_ops(lm)
    for m in lora_modules(lm).values():
        m.fused = not plain
    lm.config.use_cache = False
    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in lm.model.layers[max(len(lm.model.layers) - uncheckpointed, 0) :]:
            layer.gradient_checkpointing = False
    if offload:
        from qlora_kit.model.offload import offload_embeddings, use_offloaded_checkpointing

        use_offloaded_checkpointing(lm)
        offload_embeddings(lm)
    model = SFTModel(lm, chunked_loss=not plain).train()
    return model, lambda ids: model(input_ids=ids, labels=ids)["loss"]


def build_stock(config, rank: int, checkpointing: bool):
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    g = torch.Generator("cuda").manual_seed(0)
    for layer in model.model.layers:
        for name, m in list(layer.named_modules()):
            if isinstance(m, torch.nn.Linear):
                w = torch.empty(m.out_features, m.in_features, device="cuda", dtype=torch.bfloat16).normal_(
                    0, 0.02, generator=g
                )
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
                    "cuda"
                )
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, q)
                del w
    for name, p in list(model.named_parameters()):
        if p.device.type == "meta":
            value = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape) * 0.02
            module, _, attr = name.rpartition(".")
            setattr(
                model.get_submodule(module),
                attr,
                torch.nn.Parameter(value.to("cuda", torch.bfloat16), requires_grad=False),
            )
    model.tie_weights()
    model.model.rotary_emb.to("cuda")
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model.train()
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def run_side(side: str, config, args) -> dict:
    import bitsandbytes as bnb

    gc.collect()  # the previous side's model sits in reference cycles (hooks): free it before measuring
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if side == "stock":
        model, step_loss = build_stock(config, args.rank, not args.no_checkpointing)
    else:
        model, step_loss = build_ours(
            config,
            args.rank,
            not args.no_checkpointing,
            fused=side != "ours-unfused",
            qat=side == "ours-qat",
            offload=side == "ours-offload",
            uncheckpointed=args.uncheckpointed,
            plain=side == "plain-path",
        )
    weights_bytes = torch.cuda.memory_allocated()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=args.lr)
    g = torch.Generator("cuda").manual_seed(1)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda", generator=g)
        for _ in range(1 if args.same_batch else args.warmup + args.steps)
    ]
    batches = batches * (args.warmup + args.steps) if args.same_batch else batches
    losses, times = [], []

    def train_step(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_loss(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i, ids in enumerate(batches):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = train_step(ids)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            train_step(batches[-1])
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
        with open(f"{args.profile}.{side}.txt", "w") as f:
            f.write(table)
    step = sorted(times)[len(times) // 2]
    result = {
        "side": side,
        "step_s": step,
        "tokens_per_s": args.batch * args.seq / step,
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "weights_bytes": weights_bytes,
        "lora_params": sum(p.numel() for p in params),
        "losses": losses,
    }
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--side",
        default="both",
        help="comma-separated: stock, ours, ours-unfused (no fused kernels), ours-qat (int4 g128 QAT), "
        "ours-offload (checkpoints and embeddings in CPU memory), plain-path (training.fused_kernels=false); "
        "both = stock,ours",
    )
    parser.add_argument("--cap-gb", type=float, help="cap this process's GPU memory (GB), as for the long-context test")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument(
        "--same-batch", action="store_true", help="train on one batch throughout (a loss curve that falls)"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--uncheckpointed",
        type=int,
        default=0,
        help="ours: the last N decoder layers keep activations instead of recomputing them",
    )
    parser.add_argument("--profile", help="write a torch.profiler table of one timed step to this file")
    parser.add_argument("--json")
    args = parser.parse_args()
    config = llama_config(args.shape, **({"num_hidden_layers": args.layers} if args.layers else {}))
    if args.cap_gb:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.cap_gb * 1e9 / torch.cuda.get_device_properties(0).total_memory)
        )
    peak_tflops = matmul_tflops()
    sides = ["stock", "ours"] if args.side == "both" else args.side.split(",")
    unknown = set(sides) - {"stock", "ours", "ours-unfused", "ours-qat", "ours-offload", "plain-path"}
    if unknown:
        parser.error(f"unknown --side {sorted(unknown)}")
    results = {
        "device": torch.cuda.get_device_name(),
        "shape": args.shape,
        "layers": config.num_hidden_layers,
        "seq": args.seq,
        "batch": args.batch,
        "rank": args.rank,
        "matmul_tflops": peak_tflops,
        "sides": {},
    }
    for side in sides:
        try:
            r = run_side(side, config, args)
            r["mfu"] = (
                model_flops_per_step(config, r["lora_params"], args.batch, args.seq)
                / r["step_s"]
                / (peak_tflops * 1e12)
            )
        except torch.OutOfMemoryError as e:
            r = {"side": side, "error": f"out of memory: {str(e).splitlines()[0]}"}
            gc.collect()
            torch.cuda.empty_cache()
        results["sides"][side] = r
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))

    gib = 1 / 2**30
    print(
        f"\n{args.shape} ({config.num_hidden_layers} layers), seq {args.seq}, batch {args.batch}, LoRA r={args.rank}, "
        f"{results['device']}, bf16 matmul {peak_tflops:.0f} TFLOP/s"
    )
    print(f"{'':14}{'s/step':>9}{'tokens/s':>10}{'peak GiB':>10}{'MFU':>7}   losses")
    for side, r in results["sides"].items():
        if "error" in r:
            print(f"{side:14}{r['error']}")
            continue
        print(
            f"{side:14}{r['step_s']:9.3f}{r['tokens_per_s']:10.0f}{r['peak_allocated'] * gib:10.2f}{r['mfu']:7.1%}   "
            + " ".join(f"{x:.3f}" for x in r["losses"][:3])
        )
    stock = results["sides"].get("stock", {})
    for side, r in results["sides"].items():
        if side != "stock" and "error" not in r and "error" not in stock and stock:
            print(
                f"{side}/stock: tokens/s {r['tokens_per_s'] / stock['tokens_per_s']:.2f}x, "
                f"peak memory {r['peak_allocated'] / stock['peak_allocated']:.2f}x"
            )
    if "ours" in results["sides"] and "plain-path" in results["sides"]:
        fast, plain = results["sides"]["ours"]["losses"], results["sides"]["plain-path"]["losses"]
        print(
            f"loss curves over {len(fast)} steps, fast path vs plain path: max |difference| "
            f"{max(abs(a - b) for a, b in zip(fast, plain)):.4f} (loss {plain[0]:.3f} -> {plain[-1]:.3f})"
        )
    if "ours" in results["sides"] and "ours-qat" in results["sides"]:
        ours, qat = results["sides"]["ours"], results["sides"]["ours-qat"]
        print(f"QAT step-time overhead: {qat['step_s'] / ours['step_s'] - 1:+.1%}")


if __name__ == "__main__":
    main()
