"""The frozen base's GEMMs in bf16 and in FP8 e4m3, per Llama-3-8B projection shape (CUDA).

For each weight shape, at --tokens rows: the forward ``x @ W^T`` and the input gradient
``dy @ W`` as qlora_kit.modules.nf4_linear.base_matmul runs them (dequant included), in
the compute dtype and with ``fp8`` set, and the FP8 path's pieces (the weight's e4m3
dequant, and transposed for dX, the rowwise quantization of x, the e4m3 GEMM). The ratio is the lever's speedup
on the GEMMs, which are about 70% of a training step.

    python scripts/bench_fp8.py
    python scripts/bench_fp8.py --tokens 8192 --shapes 4096x4096,14336x4096,4096x14336
"""

from __future__ import annotations

import argparse

import torch

from qlora_kit.compat import scaled_mm
from qlora_kit.modules.nf4_linear import NF4Linear, base_matmul, base_matmul_grad_input
from qlora_kit.quant import fp8
from qlora_kit.quant.nf4 import quantize_nf4

# Llama-3-8B: q/o, k/v, gate/up, down.
SHAPES = "4096x4096,1024x4096,14336x4096,4096x14336"


def cuda_ms(fn, rep: int) -> float:
    """Median milliseconds of ``fn()`` over ``rep`` calls, timed by CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(n: int, k: int, tokens: int, rep: int) -> tuple[dict, dict]:
    """Forward and input-gradient milliseconds of one [n, k] NF4 weight, bf16 and FP8, and the FP8 pieces."""
    layer = NF4Linear(quantize_nf4(torch.randn(n, k, device="cuda") / k**0.5), compute_dtype=torch.bfloat16)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    times = {}
    for on in (False, True):
        layer.fp8 = on
        times[on] = (
            # A new view each call: x quantized every time, as for a projection whose input no other shares.
            cuda_ms(lambda: base_matmul(x.view_as(x), layer), rep),
            cuda_ms(lambda: base_matmul_grad_input(g, layer), rep),
        )
    w_q, w_s = layer.fp8_weight()
    xq, xs = fp8.quantize_rows(x)
    pieces = {
        "weight": cuda_ms(layer.fp8_weight, rep),
        "rows": cuda_ms(lambda: fp8.quantize_rows(x), rep),
        "gemm": cuda_ms(
            lambda: scaled_mm(xq, w_q.t(), xs, w_s, torch.bfloat16),
            rep,
        ),
        "weight^T": cuda_ms(lambda: layer.fp8_weight(transposed=True), rep),
    }
    return times, pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="rows of x (batch x seq)")
    parser.add_argument("--shapes", default=SHAPES, help="weights as OUTxIN, comma-separated")
    parser.add_argument("--rep", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8 needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, {args.tokens} tokens, times in ms (median of {args.rep})")
    print(f"{'weight':>12}{'bf16 fwd':>10}{'fp8 fwd':>9}{'bf16 dX':>9}{'fp8 dX':>8}{'speedup':>9}   fp8 pieces")
    total_bf16 = total_fp8 = 0.0
    for spec in args.shapes.split(","):
        n, k = (int(v) for v in spec.split("x"))
        times, pieces = measure(n, k, args.tokens, args.rep)
        bf16, e4m3 = sum(times[False]), sum(times[True])
        total_bf16, total_fp8 = total_bf16 + bf16, total_fp8 + e4m3
        print(
            f"{spec:>12}{times[False][0]:10.3f}{times[True][0]:9.3f}{times[False][1]:9.3f}{times[True][1]:8.3f}"
            f"{bf16 / e4m3:8.2f}x   " + ", ".join(f"{name} {ms:.3f}" for name, ms in pieces.items())
        )
    print(f"{'all':>12}{'':36}{total_bf16 / total_fp8:9.2f}x")


if __name__ == "__main__":
    main()
