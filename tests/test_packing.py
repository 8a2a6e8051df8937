"""GPTQ v1 / AWQ gemm layouts, checked by a reader and a writer written from docs/formats.md.

The reader and writer below use plain Python ints and loops, not packing.py.
"""

import pytest
import torch

from qlora_kit.quant.gptq import GPTQ
from qlora_kit.quant.intq import rtn_quantize
from qlora_kit.quant.packing import (
    marlin_compatible,
    pack_awq_gemm,
    pack_gptq_v1,
    unpack_awq_gemm,
    unpack_gptq_v1,
)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def u32(word):
    return int(word) & 0xFFFFFFFF


def nibble(word, i):
    return (u32(word) >> (4 * i)) & 0xF


def read_gptq_v1(t):
    """docs/formats.md: qweight [K/8, N], input channel 8*row+j in bits 4j..4j+3; qzeros [G, N/8]
    packed along N the same way, storing zero-1; W = scales[g_idx] * (q - (qz + 1))."""
    k8, n = t["qweight"].shape
    q = [[nibble(t["qweight"][row, col], j) for row in range(k8) for j in range(8)] for col in range(n)]
    groups = t["qzeros"].shape[0]
    zero = [[nibble(t["qzeros"][gi, c // 8], c % 8) + 1 for gi in range(groups)] for c in range(n)]
    scale = [[float(t["scales"][gi, c]) for gi in range(groups)] for c in range(n)]
    g_idx = [int(v) for v in t["g_idx"]]
    return q, zero, scale, g_idx


def read_awq_gemm(t):
    """docs/formats.md: qweight [K, N/8], nibble i of word c holds column 8c + order[i]; raw zeros."""
    k, n8 = t["qweight"].shape
    q = [[0] * k for _ in range(n8 * 8)]
    for r in range(k):
        for c in range(n8):
            for i in range(8):
                q[8 * c + AWQ_ORDER[i]][r] = nibble(t["qweight"][r, c], i)
    groups = t["qzeros"].shape[0]
    zero = [[0] * groups for _ in range(n8 * 8)]
    for gi in range(groups):
        for c in range(n8):
            for i in range(8):
                zero[8 * c + AWQ_ORDER[i]][gi] = nibble(t["qzeros"][gi, c], i)
    scale = [[float(t["scales"][gi, c]) for gi in range(groups)] for c in range(n8 * 8)]
    return q, zero, scale


def to_int32(word):
    return word - (1 << 32) if word >= 1 << 31 else word


def write_gptq_v1(q, zero, scale, g_idx):
    """A loader-side writer from the same table, to test the unpackers."""
    n, k = q.shape
    groups = scale.shape[1]
    qweight = [[0] * n for _ in range(k // 8)]
    for row in range(k // 8):
        for col in range(n):
            qweight[row][col] = to_int32(sum(int(q[col, 8 * row + j]) << (4 * j) for j in range(8)))
    qzeros = [[0] * (n // 8) for _ in range(groups)]
    for gi in range(groups):
        for c in range(n // 8):
            qzeros[gi][c] = to_int32(sum((int(zero[8 * c + j, gi]) - 1) << (4 * j) for j in range(8)))
    return {
        "qweight": torch.tensor(qweight, dtype=torch.int32),
        "qzeros": torch.tensor(qzeros, dtype=torch.int32),
        "scales": scale.t().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def write_awq_gemm(q, zero, scale):
    n, k = q.shape
    groups = scale.shape[1]
    qweight = [[0] * (n // 8) for _ in range(k)]
    for r in range(k):
        for c in range(n // 8):
            qweight[r][c] = to_int32(sum(int(q[8 * c + AWQ_ORDER[i], r]) << (4 * i) for i in range(8)))
    qzeros = [[0] * (n // 8) for _ in range(groups)]
    for gi in range(groups):
        for c in range(n // 8):
            qzeros[gi][c] = to_int32(sum(int(zero[8 * c + AWQ_ORDER[i], gi]) << (4 * i) for i in range(8)))
    return {
        "qweight": torch.tensor(qweight, dtype=torch.int32),
        "qzeros": torch.tensor(qzeros, dtype=torch.int32),
        "scales": scale.t().to(torch.float16),
    }


def quantized(n, k, group_size, symmetric, act_order=False, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(n, k)
    if not act_order:
        w = rtn_quantize(weight, group_size=group_size, symmetric=symmetric)
    else:
        layer = GPTQ(k)
        layer.add_batch(torch.randn(64, k) * torch.linspace(0.2, 3.0, k)[torch.randperm(k)])
        w = layer.quantize(weight, group_size=group_size, symmetric=symmetric, act_order=True)
    # Every code value, 15 in a top nibble included (a negative int32), must survive.
    assert int(w.q.min()) == 0 and int(w.q.max()) == 15
    return w


def as_lists(w):
    return w.q.tolist(), w.zero.tolist(), w.scale.half().float().tolist(), w.g_idx.tolist()


GPTQ_CASES = [
    (8, 16, 8, True, False),
    (16, 64, 32, True, False),
    (24, 32, -1, True, False),
    (16, 64, 16, False, False),
    (8, 64, 16, True, True),
    (16, 64, 32, False, True),
]


@pytest.mark.parametrize("n,k,group_size,symmetric,act_order", GPTQ_CASES)
def test_gptq_v1_independent_reader_recovers_codes(n, k, group_size, symmetric, act_order):
    w = quantized(n, k, group_size, symmetric, act_order)
    if not symmetric:
        w.zero.clamp_(min=1)  # v1 cannot store zero 0 (see test below)
    bias = torch.randn(n)
    t = pack_gptq_v1(w, bias=bias)
    groups = 1 if group_size == -1 else k // group_size
    expected = {
        "qweight": ((k // 8, n), torch.int32),
        "qzeros": ((groups, n // 8), torch.int32),
        "scales": ((groups, n), torch.float16),
        "g_idx": ((k,), torch.int32),
        "bias": ((n,), torch.float16),
    }
    assert {name: (tuple(v.shape), v.dtype) for name, v in t.items()} == expected
    assert torch.equal(t["bias"], bias.half())

    q, zero, scale, g_idx = read_gptq_v1(t)
    assert (q, zero, scale, g_idx) == as_lists(w)

    back = unpack_gptq_v1(t, group_size, symmetric)
    assert torch.equal(back.q, w.q) and torch.equal(back.zero, w.zero) and torch.equal(back.g_idx, w.g_idx)
    assert torch.equal(back.scale, w.scale.half().float())


def test_gptq_v1_symmetric_zero_is_stored_as_seven():
    t = pack_gptq_v1(rtn_quantize(torch.randn(16, 32), group_size=16, symmetric=True))
    assert (t["qzeros"] == 0x77777777).all()


@pytest.mark.parametrize(
    "n,k,group_size,symmetric", [(8, 16, 8, False), (16, 64, 32, False), (32, 32, -1, False), (8, 32, 16, True)]
)
def test_awq_gemm_independent_reader_recovers_codes(n, k, group_size, symmetric):
    w = quantized(n, k, group_size, symmetric)
    t = pack_awq_gemm(w)
    groups = 1 if group_size == -1 else k // group_size
    expected = {
        "qweight": ((k, n // 8), torch.int32),
        "qzeros": ((groups, n // 8), torch.int32),
        "scales": ((groups, n), torch.float16),
    }
    assert {name: (tuple(v.shape), v.dtype) for name, v in t.items()} == expected

    q, zero, scale = read_awq_gemm(t)
    lq, lzero, lscale, _ = as_lists(w)
    assert (q, zero, scale) == (lq, lzero, lscale)

    back = unpack_awq_gemm(t, group_size)
    assert torch.equal(back.q, w.q) and torch.equal(back.zero, w.zero) and torch.equal(back.g_idx, w.g_idx)
    assert torch.equal(back.scale, w.scale.half().float())


def test_unpackers_read_independently_written_checkpoints():
    w = quantized(16, 32, 8, symmetric=False, seed=3)
    w.zero.clamp_(min=1)
    back = unpack_gptq_v1(write_gptq_v1(w.q, w.zero, w.scale, w.g_idx), 8, symmetric=False)
    assert torch.equal(back.q, w.q) and torch.equal(back.zero, w.zero)
    assert torch.equal(back.scale, w.scale.half().float())
    back = unpack_awq_gemm(write_awq_gemm(w.q, w.zero, w.scale), 8)
    assert torch.equal(back.q, w.q) and torch.equal(back.zero, w.zero)
    assert torch.equal(back.scale, w.scale.half().float())


def test_bad_layouts_raise_clear_errors():
    with pytest.raises(ValueError, match=r"N=12, K=32"):
        pack_gptq_v1(rtn_quantize(torch.randn(12, 32), group_size=16))
    with pytest.raises(ValueError, match=r"N=8, K=20"):
        pack_awq_gemm(rtn_quantize(torch.randn(8, 20), group_size=-1))
    with pytest.raises(ValueError, match="bits=3"):
        pack_awq_gemm(rtn_quantize(torch.randn(8, 32), bits=3, group_size=16))
    with pytest.raises(ValueError, match="zero point of 0"):
        w = rtn_quantize(torch.rand(8, 32) + 1.0, group_size=16, symmetric=False)
        pack_gptq_v1(w)
    w = quantized(8, 64, 16, True, act_order=True)
    with pytest.raises(ValueError, match="act-order"):
        pack_awq_gemm(w)
    with pytest.raises(ValueError, match="bias"):
        pack_gptq_v1(rtn_quantize(torch.randn(8, 32), group_size=16), bias=torch.randn(4))
    t = pack_gptq_v1(rtn_quantize(torch.randn(8, 32), group_size=16))
    with pytest.raises(ValueError, match="scales"):
        unpack_gptq_v1({**t, "scales": t["scales"][:1]}, 16)
    with pytest.raises(ValueError, match="K=32"):
        unpack_gptq_v1(t, 24)


def test_marlin_conditions():
    assert marlin_compatible(4096, 4096, 128, True)
    assert marlin_compatible(256, 64, -1, True)
    assert marlin_compatible(256, 128, 32, True)
    assert not marlin_compatible(4096, 4096, 128, False)
    assert not marlin_compatible(576, 576, 64, True)  # SmolLM2: K % 128 != 0
    assert not marlin_compatible(4096, 96, 128, True)
    assert not marlin_compatible(4096, 4096, 256, True)
