"""Triton kernels for NF4 with double quantization (bitsandbytes' layout).

Its length: the two kernels and their launch plans (validation, tuned config, direct launch)
belong to one format and one set of bit-exactness tests.

Three kernels, each computing exactly the bits of the torch reference in
``qlora_kit.quant.nf4``:

- ``dequantize_nf4_dq``: one pass from packed 4-bit codes + 8-bit absmax codes to a
  bf16/fp16/fp32 weight, or an e4m3 one when the code table comes pre-divided by the
  weight's FP8 scale (``qlora_kit.quant.fp8``). It is memory bound: per output element it reads 0.5 byte of
  codes + 1/64 byte of absmax code and writes 2 bytes (bf16), so the time floor is
  ~2.52 bytes/element at copy bandwidth.
- ``dequantize_nf4_dq_t``: the same weight written transposed (``W^T``), by 2-d tiles,
  for the FP8 GEMM of the input gradient.
- ``quantize_nf4_blocks``: the first-level quantization (per-block absmax, nearest
  NF4 code, nibble packing); the torch code double-quantizes the fp32 absmax.

Design notes and the bandwidth arithmetic: docs/kernels.md.
"""

from __future__ import annotations

import functools

import torch

from qlora_kit import compat
from qlora_kit.kernels._triton import INTERPRET as _INTERPRET
from qlora_kit.kernels._triton import available, tl, triton  # noqa: F401 (available is re-exported)

# Dequant tiles: (BLOCK elements, num_warps), autotuned per weight size on CUDA. A tile
# holds whole absmax blocks and lies inside one nested block (BLOCK <= 64 * 256).
_DEQUANT_CONFIGS = ((2048, 4), (4096, 4), (4096, 8), (8192, 4), (8192, 8))
_MAX_BLOCK = max(b for b, _ in _DEQUANT_CONFIGS)
_MIN_BLOCK = min(b for b, _ in _DEQUANT_CONFIGS)
_INTERPRET_BLOCK = 2048  # fixed under TRITON_INTERPRET=1: no autotuning on the CPU
_QUANT_BLOCK = 2048  # quantization is compute-light and runs once per weight: not tuned
_QUANT_WARPS = 4


if triton is not None:

    @triton.jit
    def _dequant_kernel(
        packed_ptr,
        absmax_q_ptr,
        nested_ptr,
        offset_ptr,
        code4_ptr,
        code8_ptr,
        out_ptr,
        n,
        n_bytes,
        n_blocks,
        BLOCK: tl.constexpr,
        BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
        VEC: tl.constexpr,
        EVEN: tl.constexpr,
        BF16_BY_BITS: tl.constexpr,
    ):
        ROWS: tl.constexpr = BLOCK // BLOCKSIZE  # absmax blocks in the tile
        GROUPS: tl.constexpr = BLOCK // (2 * VEC)  # groups of VEC packed bytes in the tile
        # 64-bit tile base, 32-bit offsets inside the tile: weights may exceed 2^31 elements.
        pid = tl.program_id(0).to(tl.int64)
        packed_ptr += pid * (BLOCK // 2)
        absmax_q_ptr += pid * ROWS
        out_ptr += pid * BLOCK

        # The tile as [group, VEC bytes]: a thread loads VEC contiguous packed bytes and expands
        # them to 2 * VEC outputs, exactly one 16-byte store (VEC = 4 for bf16/fp16, 2 for fp32).
        # Load and store share one register layout (no conversion through shared memory), and
        # consecutive lanes take consecutive groups: a warp reads 128 contiguous bytes and
        # writes 512. (A 3-d [block, group, byte] tile lets triton 3.6 put lanes along blocks,
        # which strides every access.)
        group = tl.arange(0, GROUPS)[:, None]
        byte = group * VEC + tl.arange(0, VEC)[None, :]
        elem = group * (2 * VEC) + tl.arange(0, 2 * VEC)[None, :]
        block = group // (BLOCKSIZE // (2 * VEC))  # absmax block of each group, within the tile
        if EVEN:  # no partial tile: no masks, so every access stays a full vector
            block_mask = None
            byte_mask = None
            elem_mask = None
        else:
            block_mask = block < n_blocks - pid * ROWS
            byte_mask = byte < n_bytes - pid * (BLOCK // 2)
            elem_mask = elem < n - pid * BLOCK

        # absmax of each group's block: code8[absmax_q] * nested_absmax + offset, in fp32. The
        # launch sets enable_fp_fusion=False so the multiply and add stay two roundings, as in
        # torch. A tile never straddles nested blocks (checked on launch): one nested_absmax.
        q = tl.load(absmax_q_ptr + block, mask=block_mask).to(tl.int32)
        nested = tl.load(nested_ptr + pid * ROWS // NESTED_BLOCKSIZE)
        absmax = tl.load(code8_ptr + q) * nested + tl.load(offset_ptr)

        # Masked-off lanes hold any byte: their table indices stay in [0, 16) and they are not stored.
        packed = tl.load(packed_ptr + byte, mask=byte_mask)
        # The 16-entry table is one 64-byte line: a warp's gather from it is one L1 wavefront.
        high = tl.load(code4_ptr + (packed >> 4).to(tl.int32)) * absmax
        low = tl.load(code4_ptr + (packed & 0xF).to(tl.int32)) * absmax
        # Element 2i is the high nibble, 2i+1 the low: interleaving puts them in memory order.
        w = tl.interleave(high, low)
        if BF16_BY_BITS:
            # Round to nearest even on the bits: the interpreter's fp32->bf16 cast does not
            # (on the GPU the plain cast is cvt.rn.bf16x2.f32, one instruction per pair).
            bits = w.to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            w = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out_ptr + elem, w.to(out_ptr.dtype.element_ty), mask=elem_mask)

    @triton.jit
    def _dequant_t_kernel(
        packed_ptr,
        absmax_q_ptr,
        nested_ptr,
        offset_ptr,
        code4_ptr,
        code8_ptr,
        out_ptr,
        N,
        K,
        BN: tl.constexpr,
        BK: tl.constexpr,
        BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
    ):
        # A [BN rows, BK columns] tile of W [N, K], written transposed into out = W^T [K, N]:
        # the layout an FP8 GEMM needs for dy @ W (its reduction dimension, N, contiguous).
        # K is a multiple of BK and of BLOCKSIZE, so element (n, k) is packed byte n * K/2 + k/2
        # and lies in absmax block n * K/BLOCKSIZE + k/BLOCKSIZE. The same fp32 arithmetic as
        # _dequant_kernel (launched without fp fusion), so the bits are W's, transposed.
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        half = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)
        row_mask = (rows < N)[:, None]
        row64 = rows.to(tl.int64)[:, None]
        packed = tl.load(packed_ptr + row64 * (K // 2) + half[None, :], mask=row_mask, other=0)
        block = row64 * (K // BLOCKSIZE) + (2 * half[None, :]) // BLOCKSIZE
        q = tl.load(absmax_q_ptr + block, mask=row_mask, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + block // NESTED_BLOCKSIZE, mask=row_mask, other=0.0)
        absmax = tl.load(code8_ptr + q) * nested + tl.load(offset_ptr)
        high = tl.load(code4_ptr + (packed >> 4).to(tl.int32)) * absmax
        low = tl.load(code4_ptr + (packed & 0xF).to(tl.int32)) * absmax
        w = tl.interleave(high, low)  # [BN, BK], element 2i the high nibble
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        out = out_ptr + cols.to(tl.int64)[:, None] * N + rows[None, :]
        tl.store(out, tl.trans(w).to(out_ptr.dtype.element_ty), mask=(rows < N)[None, :])

    @triton.jit
    def _quant_kernel(
        x_ptr,
        midpoints_ptr,
        packed_ptr,
        absmax_ptr,
        n,
        n_bytes,
        n_blocks,
        BLOCK: tl.constexpr,
        BLOCKSIZE: tl.constexpr,
    ):
        ROWS: tl.constexpr = BLOCK // BLOCKSIZE  # absmax blocks in the tile
        HALF: tl.constexpr = BLOCKSIZE // 2  # packed bytes per block
        pid = tl.program_id(0).to(tl.int64)
        x_ptr += pid * BLOCK
        packed_ptr += pid * (BLOCK // 2)
        absmax_ptr += pid * ROWS

        row = tl.arange(0, ROWS)
        elem = row[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        # Elements past n read as 0: they leave max|x| unchanged and get code 7, the pad nibble.
        x = tl.load(x_ptr + elem, mask=elem < n - pid * BLOCK, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        tl.store(absmax_ptr + row, absmax, mask=row < n_blocks - pid * ROWS)

        # Multiply by an IEEE reciprocal (div_rn: triton's '/' is approximate), as bitsandbytes does.
        # 1e-38 is below fp32's normal range: spell the fp32 constant out (a bare literal is fp64).
        tiny = tl.full((ROWS,), 1e-38, tl.float32)
        inv = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.maximum(absmax, tiny))
        scaled = tl.minimum(tl.maximum(x * inv[:, None], -1.0), 1.0)
        # Nearest code = number of midpoints strictly below the value: a tie goes to the lower code.
        code = tl.zeros((ROWS, BLOCKSIZE), dtype=tl.int32)
        for i in tl.static_range(15):
            code += (scaled > tl.load(midpoints_ptr + i)).to(tl.int32)

        # Element 2i goes to the high nibble, 2i+1 to the low.
        high, low = tl.split(tl.reshape(code, (ROWS, HALF, 2)))
        byte = row[:, None] * HALF + tl.arange(0, HALF)[None, :]
        tl.store(packed_ptr + byte, ((high << 4) | low).to(tl.uint8), mask=byte < n_bytes - pid * (BLOCK // 2))

    _dequant_autotuned = triton.autotune(
        configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in _DEQUANT_CONFIGS],
        key=["n"],  # the arguments' dtypes (the output dtype) are part of the key too
    )(triton.heuristics({"EVEN": lambda args: args["n"] % args["BLOCK"] == 0})(_dequant_kernel))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_blocksize(blocksize: int) -> None:
    if not (8 <= blocksize <= _MIN_BLOCK and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"blocksize must be a power of two in [8, {_MIN_BLOCK}], got {blocksize}")


class _Plan:
    """What a dequant signature (shape, dtype, blocksize, nested_blocksize, device) needs on every call:
    the sizes its inputs must have and, once the autotuner has chosen a tile on CUDA, the launch.

    A small weight's kernel runs for a few microseconds, so a call must not spend tens of them in
    Python: building error messages, the autotuner's and heuristics' bookkeeping, the JIT's
    argument binding. The first call of a signature goes through the autotuner; later ones
    launch the compiled kernel it chose directly (qlora_kit.compat.triton_compiled_launcher).
    """

    __slots__ = ("n", "n_bytes", "n_blocks", "n_nested", "vec", "config", "grid", "tail", "launch", "device_index")

    def __init__(self, shape: torch.Size, dtype: torch.dtype, blocksize: int, nested_blocksize: int):
        _check_blocksize(blocksize)
        if not (nested_blocksize & (nested_blocksize - 1) == 0 and blocksize * nested_blocksize >= _MAX_BLOCK):
            raise ValueError(
                f"nested_blocksize must be a power of two with blocksize * nested_blocksize >= {_MAX_BLOCK}, "
                f"got {nested_blocksize} (blocksize {blocksize})"
            )
        if dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn):
            raise ValueError(f"output dtype must be bf16/fp16/fp32/float8_e4m3fn, got {dtype}")
        self.n = shape.numel()
        self.n_bytes = (self.n + 1) // 2
        self.n_blocks = -(-self.n // blocksize)
        self.n_nested = -(-self.n_blocks // nested_blocksize)
        self.vec = 8 // dtype.itemsize  # packed bytes per thread group: 2 * VEC outputs = 16 bytes (8 for e4m3)
        self.config = None  # the autotuner's triton.Config, after the first CUDA call
        self.grid = None
        self.tail = None  # the kernel's arguments after the tensors, constexprs included
        self.launch = None  # the compiled kernel's direct launch, once made
        self.device_index = None

    def tune(self, args: tuple, consts: dict, blocksize: int, nested_blocksize: int) -> None:
        """Launch through the autotuner and keep the config it chose for later calls."""
        n = self.n
        _dequant_autotuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](*args, **consts)
        config = compat.triton_best_config(_dequant_autotuned)
        if config is None:  # this triton does not say: every call goes through the autotuner
            return
        block = config.kwargs["BLOCK"]
        self.grid = (triton.cdiv(n, block),)
        self.tail = (
            n,
            self.n_bytes,
            self.n_blocks,
            block,
            blocksize,
            nested_blocksize,
            self.vec,
            n % block == 0,
            False,
        )
        self.config = config

    def _jit_kwargs(self, consts: dict) -> dict:
        # The autotuner's keyword order (the call's, the config's, the heuristic's): triton's
        # kernel cache key spells the options out in order, so the JIT finds what it compiled.
        return {**consts, **self.config.all_kwargs(), "EVEN": self.tail[7]}

    def jit_launch(self, args: tuple, consts: dict) -> None:
        """The normal launch with the chosen config: triton binds and specializes the arguments itself."""
        _dequant_kernel[self.grid](*args, **self._jit_kwargs(consts))

    def make_launch(self, args: tuple, consts: dict, device_index: int) -> None:
        """The direct launch of the kernel the JIT compiled for these (16-byte aligned) arguments,
        or, where triton's compiled kernels lack the interface, the JIT's launch with the chosen config."""
        kwargs = self._jit_kwargs(consts)
        kernel = _dequant_kernel.warmup(*args, grid=self.grid, **kwargs)
        options = {k: v for k, v in kwargs.items() if k not in _dequant_kernel.arg_names}
        self.launch = compat.triton_compiled_launcher(kernel, self.grid) or functools.partial(
            _dequant_kernel[self.grid], **options
        )
        self.device_index = device_index


# One plan per signature; a process sees a few dozen weight shapes.
_PLANS: dict[tuple, _Plan] = {}


def _raise_bad_input(plan: _Plan, shape: torch.Size, device: torch.device, tensors: tuple) -> None:
    names = ("packed", "absmax_q", "nested_absmax", "offset", "code4", "code8")
    expected = (
        (torch.uint8, plan.n_bytes),
        (torch.uint8, plan.n_blocks),
        (torch.float32, plan.n_nested),
        (torch.float32, 1),
        (torch.float32, 16),
        (torch.float32, 256),
    )
    for name, t, (t_dtype, numel) in zip(names, tensors, expected):
        _check(
            t.dtype == t_dtype and t.numel() == numel and t.device == device,
            f"{name}: expected {t_dtype} with {numel} elements on {device} for a weight of shape "
            f"{tuple(shape)}, got {t.dtype} with {t.numel()} on {t.device}",
        )


def dequantize_nf4_dq(
    packed: torch.Tensor,
    absmax_q: torch.Tensor,
    nested_absmax: torch.Tensor,
    offset: torch.Tensor,
    code4: torch.Tensor,
    code8: torch.Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    blocksize: int = 64,
    nested_blocksize: int = 256,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize an NF4 double-quantized weight in one kernel pass.

    Computes ``absmax = code8[absmax_q] * nested_absmax[block // nested_blocksize] + offset``
    and ``w = code4[nibble] * absmax[block]`` in fp32, then rounds to ``dtype``; the result
    equals ``qlora_kit.quant.nf4.dequantize_nf4_reference`` bit for bit.

    Args:
        packed: uint8 ``[(n + 1) // 2]``, element 2i in the high nibble, 2i+1 in the low.
        absmax_q: uint8 ``[ceil(n / blocksize)]``, 8-bit codes of ``absmax - offset``.
        nested_absmax: fp32 ``[ceil(n_blocks / nested_blocksize)]``.
        offset: fp32 0-d tensor (read on the device: no host sync).
        code4: fp32 ``[16]``, the NF4 code values.
        code8: fp32 ``[256]``, the signed dynamic map.
        shape: the weight's shape (n = its number of elements).
        dtype: the output dtype (bfloat16, float16, float32, or float8_e4m3fn: CUDA only).
        out: optional contiguous tensor of ``shape`` and ``dtype`` to write into.

    Returns:
        The weight, ``out`` itself when given.
    """
    if type(shape) is not torch.Size:
        shape = torch.Size(shape)
    device = packed.device
    key = (shape, dtype, blocksize, nested_blocksize, device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(shape, dtype, blocksize, nested_blocksize)
    # One expression on the fast path; the message naming the bad tensor is built only on failure.
    if not (
        packed.dtype == torch.uint8
        and packed.numel() == plan.n_bytes
        and absmax_q.dtype == torch.uint8
        and absmax_q.numel() == plan.n_blocks
        and absmax_q.device == device
        and nested_absmax.dtype == torch.float32
        and nested_absmax.numel() == plan.n_nested
        and nested_absmax.device == device
        and offset.dtype == torch.float32
        and offset.numel() == 1
        and offset.device == device
        and code4.dtype == torch.float32
        and code4.numel() == 16
        and code4.device == device
        and code8.dtype == torch.float32
        and code8.numel() == 256
        and code8.device == device
    ):
        _raise_bad_input(plan, shape, device, (packed, absmax_q, nested_absmax, offset, code4, code8))
    if not (
        packed.is_contiguous()
        and absmax_q.is_contiguous()
        and nested_absmax.is_contiguous()
        and code4.is_contiguous()
        and code8.is_contiguous()
    ):
        packed, absmax_q, nested_absmax, code4, code8 = (
            t.contiguous() for t in (packed, absmax_q, nested_absmax, code4, code8)
        )
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    elif not (out.shape == shape and out.dtype == dtype and out.is_contiguous() and out.device == device):
        raise ValueError(
            f"out: expected a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
        )

    launch = plan.launch
    # The compiled kernel assumes 16-byte aligned pointers (triton specializes on it) and the
    # device it was loaded on.
    if (
        launch is not None
        and not (
            packed.data_ptr()
            | absmax_q.data_ptr()
            | nested_absmax.data_ptr()
            | offset.data_ptr()
            | code4.data_ptr()
            | code8.data_ptr()
            | out.data_ptr()
        )
        & 15
        and torch.cuda.current_device() == plan.device_index
    ):
        launch(packed, absmax_q, nested_absmax, offset, code4, code8, out, *plan.tail)
        return out
    _launch(plan, (packed, absmax_q, nested_absmax, offset, code4, code8, out), dtype, blocksize, nested_blocksize)
    return out


def _launch(plan: _Plan, tensors: tuple, dtype: torch.dtype, blocksize: int, nested_blocksize: int) -> None:
    """Every launch but the direct one: the interpreter, the first (autotuned) call of a signature,
    unaligned pointers or another current device."""
    args = (*tensors, plan.n, plan.n_bytes, plan.n_blocks)
    consts = {
        "BLOCKSIZE": blocksize,
        "NESTED_BLOCKSIZE": nested_blocksize,
        "VEC": plan.vec,
        "BF16_BY_BITS": _INTERPRET and dtype == torch.bfloat16,
        "enable_fp_fusion": False,
    }
    if _INTERPRET:
        n = plan.n
        grid = (triton.cdiv(n, _INTERPRET_BLOCK),)
        _dequant_kernel[grid](*args, BLOCK=_INTERPRET_BLOCK, EVEN=n % _INTERPRET_BLOCK == 0, num_warps=4, **consts)
        return
    if plan.config is None:
        plan.tune(args, consts, blocksize, nested_blocksize)
    else:
        plan.jit_launch(args, consts)
    device_index = tensors[0].get_device()
    if (
        plan.config is not None
        and plan.launch is None
        and not any(t.data_ptr() % 16 for t in tensors)
        and torch.cuda.current_device() == device_index
    ):
        plan.make_launch(args, consts, device_index)


_T_TILE = 64  # rows and columns of a transposed-dequant tile


def dequantize_nf4_dq_t(
    packed: torch.Tensor,
    absmax_q: torch.Tensor,
    nested_absmax: torch.Tensor,
    offset: torch.Tensor,
    code4: torch.Tensor,
    code8: torch.Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    blocksize: int = 64,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """The transpose ``W^T`` ``[K, N]`` (contiguous) of the weight :func:`dequantize_nf4_dq` returns, bit for bit.

    For a 2-d ``shape`` ``[N, K]`` with K a multiple of 64 and of ``blocksize``; the arguments
    are :func:`dequantize_nf4_dq`'s (contiguous, on one CUDA device or under the interpreter).
    """
    _check_blocksize(blocksize)
    _check(
        len(shape) == 2 and shape[1] % _T_TILE == 0 and shape[1] % blocksize == 0,
        f"a transposed dequant needs a 2-d weight whose rows are a multiple of {_T_TILE} and {blocksize} long, "
        f"got shape {tuple(shape)}",
    )
    n, k = shape
    out = torch.empty((k, n), dtype=dtype, device=packed.device)
    grid = (triton.cdiv(n, _T_TILE), k // _T_TILE)
    _dequant_t_kernel[grid](
        packed,
        absmax_q,
        nested_absmax,
        offset,
        code4,
        code8,
        out,
        n,
        k,
        BN=_T_TILE,
        BK=_T_TILE,
        BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out


def quantize_nf4_blocks(
    flat: torch.Tensor, code4: torch.Tensor, blocksize: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-level NF4 quantization: per-block absmax and the packed nearest codes.

    Per block, ``absmax = max|x|`` (fp32); ``scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)``;
    the code is the nearest of ``code4`` with midpoint thresholds, a value exactly on a
    midpoint going to the lower code. Element 2i goes to the high nibble of byte i; an odd
    count pads the last low nibble with code 7 (zero).

    Args:
        flat: the weight (any shape, read in row-major order), fp32/fp16/bf16.
        code4: fp32 ``[16]``, the NF4 code values in increasing order.
        blocksize: elements per absmax block.

    Returns:
        ``(packed, absmax)``: uint8 ``[(n + 1) // 2]`` and fp32 ``[ceil(n / blocksize)]``,
        equal to ``qlora_kit.quant.nf4.quantize_nf4_reference``'s packed bytes and
        first-level absmax.
    """
    _check_blocksize(blocksize)
    _check(
        flat.dtype in (torch.bfloat16, torch.float16, torch.float32), f"flat: expected bf16/fp16/fp32, got {flat.dtype}"
    )
    _check(code4.dtype == torch.float32 and code4.numel() == 16, "code4: expected 16 float32 values")
    x = flat.reshape(-1).contiguous()
    n = x.numel()
    _check(n > 0, "flat: cannot quantize an empty tensor")
    n_blocks = -(-n // blocksize)
    # Midpoints in fp32 exactly as the reference computes them.
    midpoints = ((code4[:-1] + code4[1:]) / 2).contiguous()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    _quant_kernel[(triton.cdiv(n, _QUANT_BLOCK),)](
        x,
        midpoints,
        packed,
        absmax,
        n,
        packed.numel(),
        n_blocks,
        BLOCK=_QUANT_BLOCK,
        BLOCKSIZE=blocksize,
        num_warps=_QUANT_WARPS,
        enable_fp_fusion=False,
    )
    return packed, absmax
