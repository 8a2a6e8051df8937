"""One decoder layer's attention per training step, recomputed or kept (training.recompute_attention), on CUDA.

With gradient checkpointing a layer's attention runs three times a step: the forward, the
recompute in backward, the backward. With training.recompute_attention=false the recompute
takes the forward's output and logsumexp instead (qlora_kit/modules/flash_attention.py): two
passes. For the Llama-3-8B attention shape (32 query heads, 8 kv heads, head size 128, bf16,
batch 1, q/k/v laid out as the model's projections make them) this times, at each --seq, sdpa's
three passes (on the kernel sdpa picks) against the kept path's two on the flash kernel and on
the cuDNN kernel, and says which kernel sdpa picks and whether training takes the kept path
there. At --check-seq it compares each method's gradients with a float64 reference
(softmax(q k^T) v per head), the arbiter when two kernels disagree:

    python scripts/bench_attention.py --seq 8192,65536,131072 --check-seq 2048
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from qlora_kit.modules.flash_attention import AttentionFromKept, flash_forward, sdpa_kernel, supported

METHODS = ("sdpa, 3 passes", "kept on flash", "kept on cudnn")


def _inputs(seq: int, args) -> tuple[torch.Tensor, ...]:
    """q, k, v ([b, heads, seq, d] views of [b, seq, heads, d] tensors, as the projections give them) and dO."""
    gen = torch.Generator(args.device).manual_seed(seq)

    def randn(*shape):
        return torch.randn(*shape, device=args.device, dtype=torch.bfloat16, generator=gen)

    q, k, v = (randn(1, seq, h, args.head_dim).transpose(1, 2) for h in (args.heads, args.kv_heads, args.kv_heads))
    return (*(t.requires_grad_() for t in (q, k, v)), randn(1, seq, args.heads, args.head_dim))


def _step(method: str, q, k, v, grad, scale: float) -> tuple[torch.Tensor, ...]:
    """One layer's attention for a step (the checkpointed forward, then backward): dq, dk, dv."""
    gqa = q.shape[1] != k.shape[1]
    if method == METHODS[0]:
        with torch.no_grad():  # the checkpointed forward
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa).transpose(1, 2)
    else:
        with torch.no_grad():
            kept = flash_forward(q, k, v, scale, kernel=method.split()[-1] + "_attention")
        out = AttentionFromKept.apply(q, k, v, *kept, scale)
    return torch.autograd.grad(out, (q, k, v), grad)


def _reference(q, k, v, grad, scale: float) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv in float64, head by head (grouped-query heads summed into their kv head)."""
    seq, groups = q.shape[2], q.shape[1] // k.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    grads = [torch.zeros(t.shape, dtype=torch.float64, device=q.device) for t in (q, k, v)]
    for h in range(q.shape[1]):
        qh, kh, vh = (
            t.detach()[0, i].double().requires_grad_() for t, i in ((q, h), (k, h // groups), (v, h // groups))
        )
        scores = ((qh @ kh.T) * scale).masked_fill(causal, float("-inf"))
        out = scores.softmax(-1) @ vh
        dq, dk, dv = torch.autograd.grad(out, (qh, kh, vh), grad[0, :, h].double())
        grads[0][0, h] += dq
        grads[1][0, h // groups] += dk
        grads[2][0, h // groups] += dv
    return tuple(grads)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _timed(fn, reps: int) -> float:
    """Milliseconds per call (after one untimed call)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="8192,65536,131072", help="comma-separated sequence lengths to time")
    parser.add_argument("--check-seq", type=int, default=2048, help="gradients against float64 at this length")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--device", default="cuda", help="cpu: a smoke test of the script (both kept rows on CPU flash)"
    )
    args = parser.parse_args()
    scale = args.head_dim**-0.5

    q, k, v, grad = _inputs(args.check_seq, args)
    reference = _reference(q, k, v, grad, scale)
    print(f"gradients at {args.check_seq} tokens against float64 (relative; dq, dk, dv):")
    for method in METHODS:
        errors = ", ".join(f"{_relative(a, b):.2e}" for a, b in zip(_step(method, q, k, v, grad, scale), reference))
        print(f"  {method:<16} {errors}")

    print(f"\n{'seq':>8}  {'sdpa kernel':<16} {'kept taken':>10}" + "".join(f" {m + ' ms':>18}" for m in METHODS))
    for seq in map(int, args.seq.split(",")):
        q, k, v, grad = _inputs(seq, args)
        taken = "yes" if supported(q, k, v, scale) else "no"
        ms = [_timed(lambda m=m, inputs=(q, k, v, grad): _step(m, *inputs, scale), args.reps) for m in METHODS]
        print(f"{seq:>8}  {sdpa_kernel(q, k, v, scale):<16} {taken:>10}" + "".join(f" {t:>18.1f}" for t in ms))


if __name__ == "__main__":
    main()
