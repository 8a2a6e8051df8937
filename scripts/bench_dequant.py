"""Benchmark the NF4+DQ dequant kernel against bitsandbytes' dequantize_4bit (CUDA only).

For each weight shape: one bf16 weight is quantized by bitsandbytes (NF4, double
quantization) and imported without requantizing, so both dequantize the same bits; the
outputs must be equal. Times are triton.testing.do_bench medians (it clears L2 before every
call) over several copies of the weight in turn. Effective bandwidth counts the bytes a
dequant must move: packed codes + absmax codes + nested absmax + the output.

Host overhead per call (what dominates small weights, whose kernels take a few
microseconds): 1000 back-to-back calls of one weight timed with the host clock (the time to
queue a call, unless the GPU is the slower side) and with CUDA events (the GPU's timeline:
the slower of host and GPU), and the same calls replayed from a CUDA graph (the GPU's time
alone, L2-warm), for ours and bitsandbytes, each allocating its output and with out=.

    python scripts/bench_dequant.py [--shapes 4096x4096,8192x28672] [--json out.json]
    python scripts/bench_dequant.py --shapes 4096x4096,1024x4096,576x1536 --no-quantize --calls 1000
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys
import time

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
    p.add_argument("--calls", type=int, default=1000, help="back-to-back calls per host-overhead timing (default 1000)")
    p.add_argument("--graph-calls", type=int, default=100, help="calls captured in one CUDA graph (default 100)")
    return p.parse_args(argv)


def _shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def _rotating(fns):
    """One callable that runs the given ones in turn, so consecutive calls touch different memory."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def per_call_us(fn, calls: int, graph_calls: int) -> dict:
    """Microseconds per call of ``fn``: ``host`` (host clock over ``calls`` back-to-back calls, before
    synchronizing), ``events`` (CUDA events around the same calls), ``graph`` (CUDA events around
    replays of a graph capturing ``graph_calls`` calls; None, with ``graph_error``, if capture fails)."""
    import torch

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    end.record()
    end.synchronize()
    result = {"host": host / calls * 1e6, "events": start.elapsed_time(end) / calls * 1e3, "graph": None}
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(graph_calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        replays = max(1, calls // graph_calls)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        result["graph"] = start.elapsed_time(end) / (replays * graph_calls) * 1e3
        del graph
    except Exception as e:  # a library that cannot be captured: say so in the table
        result["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        torch.cuda.synchronize()
    return result


def print_per_call(rows: list[dict], calls: int, graph_calls: int) -> None:
    """The host-overhead table: per shape, a line each for the host clock, CUDA events and CUDA graphs."""
    print(
        f"\nper call, µs, {calls} back-to-back calls of one weight: host = host clock (time to queue a call), "
        f"events = CUDA events (GPU timeline), graph = CUDA-graph replay of {graph_calls} calls (GPU alone, "
        "L2-warm); bnb/ours > 1: ours faster; launch: direct = our tuned kernel launched directly, "
        "jit = through triton's JIT"
    )
    sides = ("ours", "ours_out", "bnb", "bnb_out")
    print(
        f"{'shape':>12} {'':7}{'ours':>8}{'ours out=':>10}{'bnb':>8}{'bnb out=':>9}{'bnb/ours':>10}{'out=':>7}  launch"
    )
    for r in rows:
        o = r["per_call_us"]
        for how in ("host", "events", "graph"):
            values = [o[side][how] for side in sides]
            cells = "".join(f"{v:{w}.1f}" if v is not None else f"{'n/a':>{w}}" for v, w in zip(values, (8, 10, 8, 9)))
            ratio = [
                f"{b / a:{w}.2f}x" if a and b else f"{'n/a':>{w + 1}}"
                for a, b, w in ((values[0], values[2], 9), (values[1], values[3], 6))
            ]
            shape = r["shape"] if how == "host" else ""
            print(f"{shape:>12} {how:7}{cells}{ratio[0]}{ratio[1]}  {r['launch'] if how == 'host' else ''}".rstrip())
        for side in sides:
            if "graph_error" in o[side]:
                print(f"{'':13}{side}: no CUDA graph ({o[side]['graph_error']})")
    small = [r for r in rows if math.prod(_shape(r["shape"])) <= 4096 * 4096]
    if small:
        slower = [
            f"{r['shape']} {how}"
            for r in small
            for how in ("host", "events")
            for ours, bnb in (("ours", "bnb"), ("ours_out", "bnb_out"))
            if r["per_call_us"][ours][how] > r["per_call_us"][bnb][how]
        ]
        print(
            "small weights (<= 4096x4096): ours at least as fast as bnb per call "
            + ("everywhere" if not slower else f"except: {', '.join(slower)}")
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Print which tile config the autotuner picks for each shape (a public triton knob).
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "1")

    import bitsandbytes.functional as bnbF
    import torch
    import triton.testing

    from qlora_kit.kernels import nf4 as kernels
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
        # The first call of a shape is autotuned, later ones launch the tuned kernel directly: check both.
        mismatches = 0
        for _ in range(3):
            ours = dequantize_nf4(t, torch.bfloat16, kernel="triton")
            mismatches += int((ours.view(torch.int16) != expected.view(torch.int16)).sum())  # bitwise: NaN-safe
        exact = mismatches == 0
        plan = kernels._PLANS.get((t.shape, torch.bfloat16, t.blocksize, t.nested_blocksize, t.packed.device))
        launch = "none" if plan is None or plan.launch is None else type(plan.launch).__name__
        launch = {"function": "direct", "partial": "jit"}.get(launch, launch)
        del ours, expected

        copies = max(2, -(-ROTATE_BYTES // moved))
        states = [(packed.clone(), copy.deepcopy(qs)) for _ in range(copies)]
        ts = [from_bitsandbytes(p, q) for p, q in states]
        ours_ms = bench_ms(_rotating([lambda t=t: dequantize_nf4(t, torch.bfloat16, kernel="triton") for t in ts]))
        bnb_ms = bench_ms(_rotating([lambda p=p, q=q: bnbF.dequantize_4bit(p, q) for p, q in states]))
        out = torch.empty(shape, dtype=torch.bfloat16, device=dev)
        out_ms = bench_ms(_rotating([lambda t=t, out=out: dequantize_nf4(t, out=out, kernel="triton") for t in ts]))
        del states, ts
        calls = {
            "ours": lambda t=t: dequantize_nf4(t, torch.bfloat16, kernel="triton"),
            "ours_out": lambda t=t, out=out: dequantize_nf4(t, out=out, kernel="triton"),
            "bnb": lambda p=packed, q=qs: bnbF.dequantize_4bit(p, q),
            "bnb_out": lambda p=packed, q=qs, out=out: bnbF.dequantize_4bit(p, q, out=out),
        }
        overhead = {side: per_call_us(fn, args.calls, args.graph_calls) for side, fn in calls.items()}
        del out, calls

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
                "launch": launch,
                "per_call_us": overhead,
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
    print_per_call(rows, args.calls, args.graph_calls)
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
