"""GGUF block quantizers: llama.cpp's ggml-quants.c formats, in torch, vectorized over blocks.

Its length: one section per GGUF type, as ggml-quants.c has them, so the file reads like the format.

A quantized GGUF tensor is its rows one after another, each row a run of fixed-size blocks
(32 weights for the legacy types, a 256-weight super-block for the K-quants). Each section
below gives one type's block as ggml-common.h lays it out (field names and byte order as in
the file) and its quantizer: a pure function from the weights to the exact block bytes.

- Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: round to nearest on the block's own scale (and minimum),
  bit for bit ``quantize_row_*_ref`` (and so ``gguf.quants.quantize``).
- Q4_K, Q5_K: 8 sub-blocks of 32 with a scale and a minimum each, searched by
  ``make_qkx2_quants``; the 16 values are stored as 6-bit integers times the fp16 super-block
  ``d`` and ``dmin``, and every weight is re-rounded on the stored grid.
- Q6_K: 16 sub-blocks of 16 with a signed scale each, searched by ``make_qx_quants``; the
  scales are int8 times the fp16 ``d``.

Importance weights (llama.cpp's imatrix: per input column, the mean of x² of the layer's
input over the calibration tokens) switch each type to llama.cpp's ``quantize_row_*_impl``
path: the searches then minimise ``Σ qw·sqrt(σ² + x²)·(x - x̂)²`` (Q6_K: ``Σ qw·(x - x̂)²``),
and the K-quants fit their 6-bit scales with ``make_qp_quants``. Q8_0 ignores them, as
llama.cpp does.

Float semantics follow the C code, so that the bytes are llama.cpp's: float32 throughout,
``nearest_int`` rounds half to even, ``roundf`` (Q8_0) half away from zero, every division is
a true division (on CUDA torch turns ``tensor / python_number`` into a multiplication by the
reciprocal, so divisors are passed as tensors), sqrt is correctly rounded (torch's vectorized
CPU float32 sqrt is not always: it goes through float64), and the searches' sums add their
terms in the C loop's order, one vectorized add per term. The searches pick the best of many
trials and each trial starts from the previous best, so one rounding difference anywhere would
send a block down another path. Every op is an elementwise IEEE op, so a GPU gives the same
bytes. (A llama.cpp build that contracts ``a*b + c`` into FMAs rounds differently; GCC does not
contract in ggml's ISO C11 mode.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

QK_K = 256  # weights in a K-quant super-block (the legacy blocks hold 32)
GROUP_MAX_EPS = 1e-15
# Rows are quantized this many weights at a time, so the searches' temporaries (a few times the
# chunk in float32) stay small; a GPU takes bigger chunks, since every op is a kernel launch.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


# ------------------------------------------------------------------ helpers


def _div(a: Tensor | float, b: Tensor | float) -> Tensor:
    """IEEE float32 ``a / b`` (python numbers become tensors: see the module docstring)."""
    like = a if isinstance(a, Tensor) else b
    if not isinstance(a, Tensor):
        a = torch.tensor(a, dtype=torch.float32, device=like.device)
    if not isinstance(b, Tensor):
        b = torch.tensor(b, dtype=torch.float32, device=like.device)
    return torch.div(a, b)


def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded float32 ``sqrtf`` (torch's vectorized CPU float32 sqrt can be 1 ulp off)."""
    return torch.sqrt(x.double()).float()


def _f32(value: float) -> float:
    """A constant computed in C as float32 arithmetic, e.g. ``nmax + 0.1f*is``."""
    return float(np.float32(value))


def _fp16(d: Tensor) -> Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(d))``: the value the file stores."""
    return d.to(torch.float16).to(torch.float32)


def _fp16_bytes(d: Tensor) -> Tensor:
    """A ``ggml_half`` field: [...] float32 -> [..., 2] little-endian bytes."""
    return d.to(torch.float16).contiguous().unsqueeze(-1).view(torch.uint8)


def _seqsum(terms: Tensor, from_zero: bool = True) -> Tensor:
    """Σ over the leading dim in the C loop's order (0 + t0 + t1 + ...), so float32 rounding matches.

    One add per term: several sums of the same length go faster stacked along dim 1.
    """
    acc = torch.zeros_like(terms[0]) + terms[0] if from_zero else terms[0].clone()
    for term in terms[1:]:
        acc += term
    return acc


def _rowsum(t: Tensor) -> Tensor:
    """``_seqsum`` over the last dim."""
    return _seqsum(t.movedim(-1, 0))


def _nearest_int(x: Tensor) -> Tensor:
    """llama.cpp's ``nearest_int``: round half to even (the 1.5·2²³ trick)."""
    return torch.round(x)


def _first_absmax(x: Tensor) -> Tensor:
    """The signed value of the first element of largest magnitude along the last dim."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _nibbles(lo: Tensor, hi: Tensor) -> Tensor:
    """``lo | hi << 4`` of two uint8 tensors of 4-bit values."""
    return (lo & 0xF) | ((hi & 0xF) << 4)


def _bits_le(bits: Tensor) -> Tensor:
    """[..., 8k] of 0/1 -> [..., k] bytes, element j in bit j % 8 of byte j // 8 (a little-endian bitfield)."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return (bits.unflatten(-1, (-1, 8)) << shifts).sum(-1).to(torch.uint8)


# ------------------------------------------------------------------ the searches of ggml-quants.c


# The searches take groups along the last dim and work on them transposed, element index first
# ([n, groups...]): each sum is then n adds of contiguous slices, and per-group values broadcast.


def make_qx_quants(x: Tensor, nmax: int, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: a signed scale per group (last dim).

    Levels ``l = clamp(nearest(x / scale), -nmax, nmax - 1)``; the scale is the weighted least
    squares fit ``Σwxl / Σwl²`` for the best of 19 trial ranges around ``max / -nmax``.
    Returns (scale, L = l + nmax in [0, 2·nmax)).
    """
    mx = _first_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)
    x, weights = x.movedim(-1, 0).contiguous(), weights.movedim(-1, 0).contiguous()
    wx = weights * x

    def levels(iscale: Tensor) -> Tensor:
        return _nearest_int(iscale * x).clamp_(-nmax, nmax - 1)

    def fit(q: Tensor) -> tuple[Tensor, Tensor]:
        return _seqsum(torch.stack([wx * q, weights * q * q], 1)).unbind(0)

    L = levels(_div(float(-nmax), mx))
    sumlx, suml2 = fit(L)
    scale = torch.where(suml2 != 0, _div(sumlx, suml2), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        trial = levels(_div(_f32(-(np.float32(nmax) + np.float32(0.1) * np.float32(step))), mx))
        sumlx, suml2 = fit(trial)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better, trial, L)
        scale = torch.where(better, _div(sumlx, suml2), scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L + nmax).movedim(0, -1)


def make_qkx_quants(
    x: Tensor, weights: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``make_qkx2_quants`` / ``make_qkx3_quants``: an affine grid ``scale·l - the_min`` per group.

    Starts from the group's [min(x, 0), max] range, then tries ``nstep + 1`` scales
    ``(nmax + rmin + rdelta·i) / range``, each followed by the weighted least-squares fit of
    scale and minimum to the levels it gives (minimum clipped to ≤ 0), keeping the fit of
    smallest weighted squared error. As in C, each trial measures its range from the best
    minimum found so far. Returns (scale, the_min ≥ 0, L in [0, nmax]).
    """
    xmax = x.amax(-1)
    xmin = x.amin(-1).clamp(max=0)
    flat = xmax == xmin
    x, weights = x.movedim(-1, 0).contiguous(), weights.movedim(-1, 0).contiguous()
    sum_w, sum_x = _seqsum(torch.stack([weights, weights * x], 1), from_zero=False).unbind(0)

    def levels(iscale: Tensor, lo: Tensor) -> Tensor:
        # A trial whose range is 0 gives nan levels, then a nan fit, and is never kept.
        return _nearest_int((iscale * (x - lo)).clamp_(0, nmax))

    def error(scale: Tensor, lo: Tensor, q: Tensor) -> Tensor:
        diff = scale * q
        diff += lo
        diff -= x
        return _seqsum(diff.mul_(diff).mul_(weights))

    iscale = _div(float(nmax), torch.where(flat, 1.0, xmax - xmin))
    scale = _div(1.0, iscale)
    lo = xmin
    L = levels(iscale, lo)
    best = error(scale, lo, L)
    for step in range(nstep + 1):
        factor = _f32(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        trial = levels(_div(factor, xmax - lo), lo)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = _seqsum(torch.stack([wl, wl * trial, wl * x], 1)).unbind(0)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        clipped = this_min > 0
        this_scale = torch.where(clipped, _div(sum_xl, sum_l2), this_scale)
        this_min = torch.where(clipped, 0.0, this_min)
        err = error(this_scale, this_min, trial)
        better = (D > 0) & (err < best)
        L = torch.where(better, trial, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    return torch.where(flat, 0.0, scale), -lo, torch.where(flat, 0.0, L).movedim(0, -1)


def make_qp_quants(x: Tensor, nmax: int, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``make_qp_quants``: non-negative values ``x`` (the K-quants' sub-block scales or minimums)
    as ``scale·L`` with L in [0, nmax], by a weighted search over 9 scales and then 5 rounds of
    coordinate descent on L. Returns (scale, L)."""
    mx = x.amax(-1).clamp(min=0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)
    x, weights = x.movedim(-1, 0).contiguous(), weights.movedim(-1, 0).contiguous()

    def mse(scale: Tensor, q: Tensor) -> Tensor:
        diff = x - scale * q
        return _seqsum(weights * diff * diff)

    iscale = _div(float(nmax), mx)
    best = mse(_div(1.0, iscale), _nearest_int(iscale * x))
    for step in range(-4, 5):
        if step == 0:
            continue
        trial = _div(_f32(np.float32(0.1) * np.float32(step) + np.float32(nmax)), mx)
        err = mse(_div(1.0, trial), _nearest_int(trial * x).clamp(max=nmax))
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better, trial, iscale)
    L = _nearest_int(iscale * x).clamp(max=nmax)
    sumlx, suml2 = _seqsum(torch.stack([weights * x * L, weights * L * L], 1)).unbind(0)
    for _ in range(5):
        for w, xi, li in zip(weights, x, L):  # li is a view: L is updated in place
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            new_l = _nearest_int(_div(xi * sl2, slx)).clamp(max=nmax)
            new_slx = slx + w * xi * new_l
            new_sl2 = sl2 + w * new_l * new_l
            accept = (slx > 0) & (sl2 > 0) & (new_l != li) & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2)
            li.copy_(torch.where(accept, new_l, li))
            sumlx = torch.where(accept, new_slx, sumlx)
            suml2 = torch.where(accept, new_sl2, suml2)
    scale = torch.where(suml2 > 0, _div(sumlx, suml2), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L).movedim(0, -1)


def _row_weights(x: Tensor, qw: Tensor) -> Tensor:
    """The legacy types' importance: ``qw·sqrt(σ² + x²)``, σ² the row's mean square."""
    sigma2 = _div(_rowsum((x * x).flatten(-2)), float(x.shape[-1] * x.shape[-2]))
    return qw * _sqrt(sigma2[:, None, None] + x * x)


# Every quantizer below takes x [rows, blocks per row, block size] (float32) and the importance
# qw [blocks per row, block size] or None, and returns [rows, blocks per row, type size] uint8.

# ------------------------------------------------------------------ Q8_0
# block_q8_0 { ggml_half d; int8_t qs[32]; }                       34 bytes, x = d·qs


def quantize_q8_0(x: Tensor, qw: Tensor | None = None) -> Tensor:
    """Q8_0: ``d = amax / 127``, ``qs = roundf(x / d)`` (half away from zero)."""
    d = _div(x.abs().amax(-1), 127.0)
    v = x * torch.where(d != 0, _div(1.0, d), 0.0).unsqueeze(-1)
    a = v.abs()
    whole = a.floor()
    qs = torch.sign(v) * (whole + torch.floor(2 * (a - whole)))
    return torch.cat([_fp16_bytes(d), qs.to(torch.int8).view(torch.uint8)], -1)


# ------------------------------------------------------------------ Q4_0
# block_q4_0 { ggml_half d; uint8_t qs[16]; }                      18 bytes, x = d·(q - 8)
# qs[j] = q[j] | q[j + 16] << 4


def quantize_q4_0(x: Tensor, qw: Tensor | None = None) -> Tensor:
    """Q4_0: ``d = max / -8`` (max the signed value of largest magnitude), ``q = x/d + 8``."""
    if qw is None:
        d = _div(_first_absmax(x), -8.0)
        q = torch.trunc(x * torch.where(d != 0, _div(1.0, d), 0.0).unsqueeze(-1) + 8.5).clamp(0, 15)
    else:
        d, q = make_qx_quants(x, 8, _row_weights(x, qw))
    q = q.to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _nibbles(q[..., :16], q[..., 16:])], -1)


# ------------------------------------------------------------------ Q4_1
# block_q4_1 { ggml_half d; ggml_half m; uint8_t qs[16]; }         20 bytes, x = d·q + m


def quantize_q4_1(x: Tensor, qw: Tensor | None = None) -> Tensor:
    """Q4_1: ``m = min``, ``d = (max - min) / 15``, ``q = (x - m)/d``."""
    if qw is None:
        m = x.amin(-1)
        d = _div(x.amax(-1) - m, 15.0)
        q = torch.trunc((x - m.unsqueeze(-1)) * torch.where(d != 0, _div(1.0, d), 0.0).unsqueeze(-1) + 0.5)
        q = q.clamp(0, 15)
    else:
        d, the_min, q = make_qkx_quants(x, _row_weights(x, qw), 15, -0.9, 0.05, 36)
        m = -the_min
    q = q.to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(m), _nibbles(q[..., :16], q[..., 16:])], -1)


# ------------------------------------------------------------------ Q5_0
# block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }       22 bytes, x = d·(q - 16)
# qs as Q4_0 with the low 4 bits; bit j of the little-endian uint32 qh is bit 4 of q[j]


def quantize_q5_0(x: Tensor, qw: Tensor | None = None) -> Tensor:
    """Q5_0: ``d = max / -16``, ``q = x/d + 16``."""
    if qw is None:
        d = _div(_first_absmax(x), -16.0)
        q = torch.trunc(x * torch.where(d != 0, _div(1.0, d), 0.0).unsqueeze(-1) + 16.5).clamp(0, 31)
    else:
        d, q = make_qx_quants(x, 16, _row_weights(x, qw))
    q = q.to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _bits_le(q >> 4), _nibbles(q[..., :16], q[..., 16:])], -1)


# ------------------------------------------------------------------ Q5_1
# block_q5_1 { ggml_half d; ggml_half m; uint8_t qh[4]; uint8_t qs[16]; }   24 bytes, x = d·q + m


def quantize_q5_1(x: Tensor, qw: Tensor | None = None) -> Tensor:
    """Q5_1: ``m = min``, ``d = (max - min) / 31``, ``q = (x - m)/d``."""
    if qw is None:
        m = x.amin(-1)
        d = _div(x.amax(-1) - m, 31.0)
        q = torch.trunc((x - m.unsqueeze(-1)) * torch.where(d != 0, _div(1.0, d), 0.0).unsqueeze(-1) + 0.5)
        q = q.clamp(0, 31)
    else:
        d, the_min, q = make_qkx_quants(x, _row_weights(x, qw), 31, -0.9, 0.05, 36)
        m = -the_min
    q = q.to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(m), _bits_le(q >> 4), _nibbles(q[..., :16], q[..., 16:])], -1)


# ------------------------------------------------------------------ Q4_K and Q5_K
# block_q4_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qs[128]; }                144 bytes
# block_q5_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } 176 bytes
# Sub-block j (32 weights): x = d·sc[j]·q - dmin·m[j], sc and m 6-bit, packed in scales[12]:
#   scales[j]     = sc[j] | (sc[j+4] >> 4) << 6     j < 4
#   scales[j + 4] = m[j]  | (m[j+4] >> 4) << 6      j < 4
#   scales[j + 8] = (sc[j+4] & 0xF) | (m[j+4] & 0xF) << 4
# qs: each 64 weights -> 32 bytes, the first 32 in the low nibbles, the next 32 in the high ones.
# Q5_K's qh[l]: bit 2c is bit 4 of weight 64c + l, bit 2c + 1 that of weight 64c + 32 + l.


def _k_scales_mins(x: Tensor, qw: Tensor | None, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Q4_K/Q5_K: (d, dmin, sc [.., 8], m [.., 8], L [.., 256]) for super-blocks x [.., 256]."""
    sub = x.unflatten(-1, (8, 32))
    if qw is None:  # quantize_row_q4_K_ref / q5_K_ref
        av_x = _sqrt(_div(_rowsum(sub * sub), 32.0))
        scales, mins, L = make_qkx_quants(sub, av_x.unsqueeze(-1) + sub.abs(), nmax, rmin, rdelta, nstep)
        max_scale, max_min = scales.amax(-1), mins.amax(-1)
        max_scale = torch.where(max_scale > 0, max_scale, 0.0)  # +0, never the -0 of an all-zero block
        max_min = torch.where(max_min > 0, max_min, 0.0)
        inv_scale = torch.where(max_scale > 0, _div(63.0, max_scale), 0.0)
        inv_min = torch.where(max_min > 0, _div(63.0, max_min), 0.0)
        sc = _nearest_int(inv_scale.unsqueeze(-1) * scales).clamp(0, 63)
        m = _nearest_int(inv_min.unsqueeze(-1) * mins).clamp(0, 63)
        d, dmin = _div(max_scale, 63.0), _div(max_min, 63.0)
    else:  # quantize_row_q4_K_impl / q5_K_impl
        sigma2 = _div(2 * _rowsum(x * x), float(QK_K))
        weights = qw.unflatten(-1, (8, 32)) * _sqrt(sigma2[..., None, None] + sub * sub)
        scales, mins, L = make_qkx_quants(sub, weights, nmax, -0.9, 0.05, 36)
        sw = _rowsum(weights)
        d, sc = make_qp_quants(scales, 63, sw)
        dmin, m = make_qp_quants(mins, 63, sw)
    # Every weight is rounded again on the grid the file stores (sub-blocks of scale 0 keep their levels).
    step = (_fp16(d).unsqueeze(-1) * sc).unsqueeze(-1)
    offset = (_fp16(dmin).unsqueeze(-1) * m).unsqueeze(-1)
    requant = _nearest_int(_div(sub + offset, step)).clamp(0, nmax)
    L = torch.where(step != 0, requant, L)
    return d, dmin, sc.to(torch.uint8), m.to(torch.uint8), L.flatten(-2).to(torch.uint8)


def _k_scale_bytes(sc: Tensor, m: Tensor) -> Tensor:
    lo, hi = slice(0, 4), slice(4, 8)
    return torch.cat(
        [
            sc[..., lo] | ((sc[..., hi] >> 4) << 6),
            m[..., lo] | ((m[..., hi] >> 4) << 6),
            _nibbles(sc[..., hi], m[..., hi]),
        ],
        -1,
    )


def quantize_q4_k(x: Tensor, qw: Tensor | None = None) -> Tensor:
    """Q4_K: 4-bit levels, sub-block scales and minimums searched by make_qkx2_quants(nmax=15)."""
    d, dmin, sc, m, L = _k_scales_mins(x, qw, 15, -1.0, 0.1, 20)
    pairs = L.unflatten(-1, (4, 2, 32))
    qs = _nibbles(pairs[..., 0, :], pairs[..., 1, :]).flatten(-2)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _k_scale_bytes(sc, m), qs], -1)


def quantize_q5_k(x: Tensor, qw: Tensor | None = None) -> Tensor:
    """Q5_K: 5-bit levels, sub-block scales and minimums searched by make_qkx2_quants(nmax=31)."""
    d, dmin, sc, m, L = _k_scales_mins(x, qw, 31, -0.5, 0.1, 15)
    pairs = L.unflatten(-1, (4, 2, 32))
    qs = _nibbles(pairs[..., 0, :], pairs[..., 1, :]).flatten(-2)
    shifts = torch.arange(8, device=x.device, dtype=torch.uint8).view(4, 2, 1)
    qh = ((pairs >> 4) << shifts).sum((-3, -2)).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _k_scale_bytes(sc, m), qh, qs], -1)


# ------------------------------------------------------------------ Q6_K
# block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; }   210 bytes
# Sub-block j (16 weights): x = d·scales[j]·(q - 32), q 6-bit. In each half h (128 weights,
# quarters k = 0..3 of 32): ql[64h + l] = q[128h + l] | q[128h + 64 + l] << 4 (low 4 bits),
# ql[64h + 32 + l] = q[128h + 32 + l] | q[128h + 96 + l] << 4, and
# qh[32h + l] = Σ_k (q[128h + 32k + l] >> 4) << 2k.


def quantize_q6_k(x: Tensor, qw: Tensor | None = None) -> Tensor:
    """Q6_K: sub-block scales from make_qx_quants(nmax=32), stored as int8 times ``d = max_scale / -128``."""
    sub = x.unflatten(-1, (16, 16))
    weights = sub * sub if qw is None else qw.unflatten(-1, (16, 16)).expand_as(sub)
    scales, L = make_qx_quants(sub, 32, weights)
    max_scale = _first_absmax(scales)
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = _div(-128.0, torch.where(zero, 1.0, max_scale))
    d = torch.where(zero, 0.0, _div(1.0, iscale))
    sc = torch.where(zero.unsqueeze(-1), 0.0, _nearest_int(iscale.unsqueeze(-1) * scales).clamp(max=127))
    step = (_fp16(d).unsqueeze(-1) * sc).unsqueeze(-1)
    requant = _nearest_int(_div(sub, step)).clamp(-32, 31) + 32
    L = torch.where(step != 0, requant, L)
    L = torch.where(zero[..., None, None], 0.0, L).to(torch.uint8)
    q = L.flatten(-2).unflatten(-1, (2, 4, 32))
    ql = torch.stack([_nibbles(q[..., 0, :], q[..., 2, :]), _nibbles(q[..., 1, :], q[..., 3, :])], -2).flatten(-3)
    shifts = torch.tensor([0, 2, 4, 6], device=x.device, dtype=torch.uint8).view(4, 1)
    qh = ((q >> 4) << shifts).sum(-2).to(torch.uint8).flatten(-2)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _fp16_bytes(d)], -1)


# ------------------------------------------------------------------ a whole tensor

QUANTIZERS: dict[GGMLQuantizationType, Callable[[Tensor, Tensor | None], Tensor]] = {
    GGMLQuantizationType.Q8_0: quantize_q8_0,
    GGMLQuantizationType.Q4_0: quantize_q4_0,
    GGMLQuantizationType.Q4_1: quantize_q4_1,
    GGMLQuantizationType.Q5_0: quantize_q5_0,
    GGMLQuantizationType.Q5_1: quantize_q5_1,
    GGMLQuantizationType.Q4_K: quantize_q4_k,
    GGMLQuantizationType.Q5_K: quantize_q5_k,
    GGMLQuantizationType.Q6_K: quantize_q6_k,
}
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def quantized_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of ``shape`` (torch order, last dim = row) stored as ``qtype``."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    numel = int(np.prod(shape))
    return numel // block * type_size


def quantize(weight: Tensor, qtype: GGMLQuantizationType, importance: Tensor | None = None) -> Tensor:
    """A tensor's GGUF data: ``weight`` [..., cols] (any float dtype and device) as ``qtype``.

    Returns uint8 [rows, cols // block · type size] on the weight's device, rows = all leading
    dims. ``importance`` [cols] (mean x² of the input per column) selects the importance-weighted
    searches; the float types and Q8_0 ignore it.
    """
    cols = weight.shape[-1]
    x = weight.detach().reshape(-1, cols).to(torch.float32)
    if qtype in _FLOAT_TYPES:
        return x.to(_FLOAT_TYPES[qtype]).contiguous().view(torch.uint8)
    if qtype not in QUANTIZERS:
        raise ValueError(f"no quantizer for GGML type {qtype.name}; expected one of {[t.name for t in QUANTIZERS]}")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if cols % block != 0:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block} weights, got {tuple(weight.shape)}")
    qw = None
    if importance is not None:
        if importance.shape != (cols,):
            raise ValueError(f"importance has shape {tuple(importance.shape)}; expected ({cols},), one per column")
        qw = importance.detach().to(x.device, torch.float32).view(cols // block, block)
    out = torch.empty(x.shape[0], cols // block * type_size, dtype=torch.uint8, device=x.device)
    step = max(1, _CHUNK_ELEMENTS.get(x.device.type, 1 << 22) // cols)
    for start in range(0, x.shape[0], step):
        rows = x[start : start + step]
        out[start : start + step] = QUANTIZERS[qtype](rows.view(rows.shape[0], -1, block), qw).flatten(1)
    return out
