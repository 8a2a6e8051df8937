"""Benchmark the NF4+DQ dequant kernel against bitsandbytes' dequantize_4bit (CUDA only).

For each weight shape: one bf16 weight is quantized by bitsandbytes (NF4, double
quantization) and imported without requantizing, so both dequantize the same bits; the
outputs must be equal. Times are triton.testing.do_bench medians (it clears L2 before every
call) over several copies of the weight in turn. Effective bandwidth counts the bytes a
dequant must move: packed codes + absmax codes + nested absmax + the output.

    python scripts/bench_dequant.py [--shapes 4096x4096,8192x28672] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys

DEFAULT_SHAPES = "4096x4096,8192x28672,28672x8192"
QUANT_SHAPE = (28672, 8192)
ROTATE_BYTES = 200 * 2**20  # each timed function cycles through >= 4x the H100's 50 MB L2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes", default=DEFAULT_SHAPES, help=f"comma-separated RxC weight shapes (default {DEFAULT_SHAPES})"
    )
    p.add_argument("--json", help="also write the results table to this JSON file")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time per case, ms (default 200)")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the copy-bandwidth buffer, MiB (default 1024)")
    p.add_argument("--no-quantize", action="store_true", help="skip timing the quantization of a 28672x8192 weight")
    return p.parse_args(argv)


def _shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def _rotating(fns):
    """One callable that runs the given ones in turn, so consecutive calls touch different memory."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Print which tile config the autotuner picks for each shape (a public triton knob).
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "1")

    import bitsandbytes.functional as bnbF
    import torch
    import triton.testing

    from qlora_kit.kernels.nf4 import available, quantize_nf4_blocks
    from qlora_kit.quant.nf4 import NF4_CODE, dequantize_nf4, from_bitsandbytes, quantize_nf4, quantize_nf4_reference

    if not torch.cuda.is_available() or not available():
        print("bench_dequant: needs a CUDA GPU and triton", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")

    def bench_ms(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=args.rep, return_mode="median")

    # Copy ceiling: bytes read + written by a device-to-device copy of a large buffer.
    src = torch.empty(args.copy_mib * 2**20, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda dst=dst, src=src: dst.copy_(src))
    copy_gbs = 2 * src.numel() / copy_ms / 1e6
    del src, dst
    print(f"copy: {args.copy_mib} MiB in {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s (read + write)")

    rows = []
    for rows_cols in args.shapes.split(","):
        shape = _shape(rows_cols)
        n = math.prod(shape)
        g = torch.Generator(device=dev).manual_seed(0)
        w = torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16)
        packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        del w
        t = from_bitsandbytes(packed, qs)
        moved = t.nbytes() + n * 2  # NF4 data in, bf16 out

        expected = bnbF.dequantize_4bit(packed, qs)
        ours = dequantize_nf4(t, torch.bfloat16, kernel="triton")
        exact = torch.equal(ours, expected)
        mismatches = int((ours.view(torch.int16) != expected.view(torch.int16)).sum())  # bitwise: NaN-safe
        del ours, expected

        copies = max(2, -(-ROTATE_BYTES // moved))
        states = [(packed.clone(), copy.deepcopy(qs)) for _ in range(copies)]
        ts = [from_bitsandbytes(p, q) for p, q in states]
        ours_ms = bench_ms(_rotating([lambda t=t: dequantize_nf4(t, torch.bfloat16, kernel="triton") for t in ts]))
        bnb_ms = bench_ms(_rotating([lambda p=p, q=q: bnbF.dequantize_4bit(p, q) for p, q in states]))
        out = torch.empty(shape, dtype=torch.bfloat16, device=dev)
        out_ms = bench_ms(_rotating([lambda t=t, out=out: dequantize_nf4(t, out=out, kernel="triton") for t in ts]))
        del states, ts, out

        def gbs(ms: float, moved: int = moved) -> float:
            return moved / ms / 1e6

        rows.append(
            {
                "shape": f"{shape[0]}x{shape[1]}",
                "bytes_moved": moved,
                "exact": exact,
                "mismatches": mismatches,
                "ours_ms": ours_ms,
                "ours_GBs": gbs(ours_ms),
                "bnb_ms": bnb_ms,
                "bnb_GBs": gbs(bnb_ms),
                "ours_out_ms": out_ms,
                "ours_out_GBs": gbs(out_ms),
                "ours_vs_bnb": bnb_ms / ours_ms,
                "ours_vs_copy": gbs(ours_ms) / copy_gbs,
            }
        )
        del packed, qs, t
        torch.cuda.empty_cache()

    quant = None
    if not args.no_quantize:
        w = torch.randn(QUANT_SHAPE, device=dev, dtype=torch.bfloat16)
        ours_t, ref_t = quantize_nf4(w), quantize_nf4_reference(w)
        same = all(
            torch.equal(getattr(ours_t, k), getattr(ref_t, k))
            for k in ("packed", "absmax_q", "nested_absmax", "offset")
        )
        bnb_packed, _ = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        code4 = torch.tensor(NF4_CODE, device=dev)
        quant = {
            "shape": f"{QUANT_SHAPE[0]}x{QUANT_SHAPE[1]}",
            "equals_reference": same,
            "packed_equals_bnb": torch.equal(ours_t.packed, bnb_packed.view(-1)),
            "kernel_ms": bench_ms(lambda: quantize_nf4_blocks(w.view(-1), code4)),
            "with_double_quant_ms": bench_ms(lambda: quantize_nf4(w)),
            "bnb_ms": bench_ms(lambda: bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)),
        }
        del w, ours_t, ref_t, bnb_packed

    print()
    if quant:
        print(
            f"quantize {quant['shape']}: kernel {quant['kernel_ms']:.3f} ms, with the double quantization "
            f"{quant['with_double_quant_ms']:.3f} ms = {quant['with_double_quant_ms'] / 1e3:.4f} s/layer "
            f"(bnb {quant['bnb_ms']:.3f} ms); equals reference: {quant['equals_reference']}, "
            f"packed equals bnb: {quant['packed_equals_bnb']}"
        )
    print(f"NF4+DQ dequant to bf16; copy ceiling {copy_gbs:.0f} GB/s; GB/s = (NF4 bytes + bf16 bytes) / time")
    print(
        f"{'shape':>12} {'exact':>6} {'ours ms':>8} {'GB/s':>6} {'bnb ms':>8} {'GB/s':>6} "
        f"{'out= ms':>8} {'GB/s':>6} {'ours/bnb':>9} {'ours/copy':>10}"
    )
    for r in rows:
        print(
            f"{r['shape']:>12} {str(r['exact']):>6} {r['ours_ms']:8.3f} {r['ours_GBs']:6.0f} {r['bnb_ms']:8.3f} "
            f"{r['bnb_GBs']:6.0f} {r['ours_out_ms']:8.3f} {r['ours_out_GBs']:6.0f} {r['ours_vs_bnb']:8.2f}x "
            f"{100 * r['ours_vs_copy']:9.1f}%"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "copy_GBs": copy_gbs, "dequant": rows, "quantize": quant},
                f,
                indent=2,
            )
    return 0 if all(r["exact"] for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
