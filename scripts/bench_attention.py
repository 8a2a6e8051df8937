"""One decoder layer's attention per training step, recomputed or kept (training.recompute_attention), on CUDA.

With gradient checkpointing a layer's attention runs three times a step: the forward, the
recompute in backward, the backward. With training.recompute_attention=false the recompute
takes the forward's output and logsumexp instead (qlora_kit/modules/flash_attention.py), on
the flash kernel. This times sdpa's three passes (on the kernel sdpa picks) against the kept
path's two flash passes for the Llama-3-8B attention shape (32 query heads, 8 kv heads, head
size 128, bf16, batch 1) at each --seq, checks their gradients agree, and says whether training
takes the kept path there (only where sdpa itself picks flash):

    python scripts/bench_attention.py --seq 8192,65536,131072
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from qlora_kit.modules.flash_attention import AttentionFromKept, flash_forward, sdpa_kernel, supported


def _timed(fn, reps: int) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _measure(seq: int, args: argparse.Namespace) -> tuple:
    """(seq, sdpa's kernel, kept path taken, ms recomputed, ms kept, max relative gradient difference)."""
    gen = torch.Generator("cuda").manual_seed(seq)
    shapes = [(1, h, seq, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads)]
    q, k, v = (torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_() for s in shapes)
    grad = torch.randn(1, seq, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = args.head_dim**-0.5
    gqa = args.heads != args.kv_heads

    def recomputed():
        with torch.no_grad():  # the checkpointed forward
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return torch.autograd.grad(out.transpose(1, 2), (q, k, v), grad)

    def kept():
        with torch.no_grad():
            out, lse, state = flash_forward(q, k, v, scale)
        return torch.autograd.grad(AttentionFromKept.apply(q, k, v, out, lse, state, scale), (q, k, v), grad)

    errors = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(kept(), recomputed())]
    taken = "yes" if supported(q, k, v, scale) else "no"
    return seq, sdpa_kernel(q, k, v, scale), taken, _timed(recomputed, args.reps), _timed(kept, args.reps), max(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="8192,65536,131072", help="comma-separated sequence lengths")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for seq in map(int, args.seq.split(",")):
        rows.append(_measure(seq, args))
        torch.cuda.empty_cache()
    print(
        f"{'seq':>8}  {'sdpa kernel':<16} {'kept taken':>10} {'sdpa 3 passes ms':>16} {'flash kept ms':>13} {'ratio':>6} {'grad rel err':>12}"
    )
    for seq, kernel, taken, ms_r, ms_k, err in rows:
        print(f"{seq:>8}  {kernel:<16} {taken:>10} {ms_r:>16.1f} {ms_k:>13.1f} {ms_r / ms_k:>5.2f}x {err:>12.2e}")


if __name__ == "__main__":
    main()
