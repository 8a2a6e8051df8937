"""The Triton NF4 kernels against the torch reference (qlora_kit.quant.nf4), bit for bit.

On a machine without CUDA the kernels run under the Triton interpreter on the CPU
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is first imported). Sizes stay
small because the interpreter is slow.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the NF4 kernels cannot run here")

import bitsandbytes.functional as bnbF  # noqa: E402

from qlora_kit.kernels.nf4 import available, dequantize_nf4_dq, quantize_nf4_blocks  # noqa: E402
from qlora_kit.quant.nf4 import (  # noqa: E402
    NF4_CODE,
    dequantize_nf4,
    dequantize_nf4_reference,
    from_bitsandbytes,
    quantize_nf4_reference,
    signed_dynamic_map,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CODE4 = torch.tensor(NF4_CODE, dtype=torch.float32, device=DEVICE)
CODE8 = signed_dynamic_map().to(DEVICE)

# n = numel. (7,): one partial block and an odd n. (100, 70): 110 blocks, the last one partial.
# (300, 257): odd n, 1205 blocks (not a multiple of 256), several nested blocks and kernel tiles.
# (64, 64) and (64, 128): whole kernel tiles, no masked tail. (257 * 64 + 1,): one element past a
# nested block boundary. (1, 63): a single partial block.
SHAPES = [(7,), (1, 63), (100, 70), (64, 64), (64, 128), (300, 257), (257 * 64 + 1,)]


def _weight(shape, dtype, seed):
    """randn scaled per row, so the absmax and the nested 8-bit codes spread over their range."""
    g = torch.Generator().manual_seed(seed)
    rows = shape[0] if len(shape) > 1 else 1
    scale = torch.rand(rows, *([1] * (len(shape) - 1)), generator=g) * 3 + 0.01
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def _dequant(t, dtype, out=None):
    return dequantize_nf4_dq(
        t.packed,
        t.absmax_q,
        t.nested_absmax,
        t.offset,
        CODE4,
        CODE8,
        t.shape,
        dtype,
        t.blocksize,
        t.nested_blocksize,
        out=out,
    )


def _first_level_absmax(w, blocksize=64):
    x = w.reshape(-1).float()
    pad = torch.nn.functional.pad(x.abs(), (0, (-x.numel()) % blocksize))
    return pad.view(-1, blocksize).amax(1)


def test_available():
    assert available()


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_reference(shape):
    t = quantize_nf4_reference(_weight(shape, torch.float32, seed=sum(shape)))
    for dtype in DTYPES:
        ours = _dequant(t, dtype)
        assert ours.shape == t.shape and ours.dtype == dtype
        assert torch.equal(ours, dequantize_nf4_reference(t, dtype)), dtype


@pytest.mark.parametrize("shape", [(64, 128), (100, 192), (3, 64)])
def test_transposed_dequantize_is_the_transpose_bit_for_bit(shape):
    from qlora_kit.kernels.nf4 import dequantize_nf4_dq_t

    t = quantize_nf4_reference(_weight(shape, torch.float32, seed=sum(shape)))
    ours = dequantize_nf4_dq_t(t.packed, t.absmax_q, t.nested_absmax, t.offset, CODE4, CODE8, t.shape, torch.float32)
    assert ours.shape == (shape[1], shape[0]) and ours.is_contiguous()
    assert torch.equal(ours, dequantize_nf4_reference(t, torch.float32).t())
    with pytest.raises(ValueError, match=r"multiple of 64 .* got shape \(64, 96\)"):
        bad = quantize_nf4_reference(_weight((64, 96), torch.float32, seed=1))
        dequantize_nf4_dq_t(
            bad.packed, bad.absmax_q, bad.nested_absmax, bad.offset, CODE4, CODE8, bad.shape, torch.float32
        )


@pytest.mark.parametrize("shape", [(7,), (100, 70), (64, 128)])
def test_dequantize_into_out_buffer(shape):
    t = quantize_nf4_reference(_weight(shape, torch.bfloat16, seed=3))
    for dtype in DTYPES:
        out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        result = _dequant(t, dtype, out=out)
        assert result is out
        # The reference has no NaN, so equality also proves every element was written.
        assert torch.equal(out, dequantize_nf4_reference(t, dtype))
        # Reused buffer: a second weight overwrites all of it.
        t2 = quantize_nf4_reference(_weight(shape, torch.bfloat16, seed=4))
        _dequant(t2, dtype, out=out)
        assert torch.equal(out, dequantize_nf4_reference(t2, dtype))


def test_dequantize_repeated_and_unaligned_calls():
    """Later calls of a signature reuse its plan (on CUDA: the direct launch of the tuned kernel);
    tensors at addresses that are not 16-byte aligned take the JIT's own launch. Same bits each time."""
    from qlora_kit.kernels import nf4

    shape = (64, 96)
    for dtype in DTYPES:
        for seed in (11, 12, 13):
            t = quantize_nf4_reference(_weight(shape, torch.float32, seed=seed))
            assert torch.equal(_dequant(t, dtype), dequantize_nf4_reference(t, dtype)), (dtype, seed)
        if DEVICE.type == "cuda":
            assert nf4._PLANS[(t.shape, dtype, 64, 256, t.packed.device)].launch is not None
        # A packed buffer and an output one element past an aligned address.
        packed = torch.empty(t.packed.numel() + 1, dtype=torch.uint8, device=DEVICE)[1:]
        packed.copy_(t.packed.view(-1))
        out = torch.full((t.shape.numel() + 1,), float("nan"), dtype=dtype, device=DEVICE)[1:].view(t.shape)
        result = dequantize_nf4_dq(packed, t.absmax_q, t.nested_absmax, t.offset, CODE4, CODE8, t.shape, dtype, out=out)
        assert result is out and torch.equal(out, dequantize_nf4_reference(t, dtype)), dtype


@pytest.mark.parametrize("blocksize", [32, 256])
def test_dequantize_other_blocksizes(blocksize):
    t = quantize_nf4_reference(_weight((40, 333), torch.float32, seed=5), blocksize=blocksize)
    assert torch.equal(_dequant(t, torch.bfloat16), dequantize_nf4_reference(t, torch.bfloat16))


def test_dequantize_rounds_to_nearest_even():
    """A code table of exact rounding ties (absmax 1): the cast must round them as torch does.

    Random weights almost never land on a tie, so this table makes every element one.
    """
    k = torch.arange(8, dtype=torch.float64) * 2 + 1
    bf16_ties, fp16_ties = 1 + k * 2.0**-8, -(1 + k * 2.0**-11)
    code4 = torch.cat([bf16_ties, fp16_ties]).float().to(DEVICE)
    n = 1000
    g = torch.Generator().manual_seed(10)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g).to(DEVICE)
    n_blocks = -(-n // 64)
    absmax_q = torch.full((n_blocks,), 255, dtype=torch.uint8, device=DEVICE)  # CODE8[255] == 1
    nested, offset = torch.ones(1, device=DEVICE), torch.zeros((), device=DEVICE)
    values = code4[torch.stack([packed >> 4, packed & 0xF], 1).view(-1)[:n].long()]
    for dtype in DTYPES:
        ours = dequantize_nf4_dq(packed, absmax_q, nested, offset, code4, CODE8, torch.Size([n]), dtype)
        assert torch.equal(ours, values.to(dtype)), dtype


def test_dequantize_bitsandbytes_state():
    """A weight quantized by bitsandbytes itself: same bits as its own dequantize_4bit."""
    w = _weight((96, 100), torch.bfloat16, seed=6).cpu()
    packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    expected = bnbF.dequantize_4bit(packed, qs)
    t = from_bitsandbytes(packed, qs).to(DEVICE)
    assert torch.equal(_dequant(t, torch.bfloat16).cpu(), expected)


def test_dispatch_uses_kernel():
    t = quantize_nf4_reference(_weight((100, 70), torch.float16, seed=7))
    out = torch.empty(t.shape, dtype=torch.float16, device=DEVICE)
    assert dequantize_nf4(t, out=out, kernel="triton") is out
    assert torch.equal(out, dequantize_nf4_reference(t))


def test_dequantize_rejects_bad_arguments():
    t = quantize_nf4_reference(_weight((64, 64), torch.float32, seed=8))
    with pytest.raises(ValueError, match="out"):
        _dequant(t, torch.bfloat16, out=torch.empty(64, 63, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        _dequant(t, torch.bfloat16, out=torch.empty(64, 64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="packed"):
        dequantize_nf4_dq(t.packed[:-1], t.absmax_q, t.nested_absmax, t.offset, CODE4, CODE8, t.shape, torch.float32)
    with pytest.raises(ValueError, match="blocksize"):
        dequantize_nf4_dq(t.packed, t.absmax_q, t.nested_absmax, t.offset, CODE4, CODE8, t.shape, torch.float32, 48)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (1, 63), (100, 70), (64, 128), (300, 257)])
def test_quantize_matches_reference(shape, dtype):
    w = _weight(shape, dtype, seed=len(shape) + shape[0])
    ref = quantize_nf4_reference(w)
    packed, absmax = quantize_nf4_blocks(w.reshape(-1), CODE4)
    assert packed.dtype == torch.uint8 and absmax.dtype == torch.float32
    assert torch.equal(packed, ref.packed)
    assert torch.equal(absmax, _first_level_absmax(w))


def test_quantize_edge_values():
    """A block of zeros, subnormal blocks (absmax below the 1e-38 clamp), exact midpoints, odd n."""
    mid = (CODE4[:-1] + CODE4[1:]) / 2
    tiny = torch.tensor([3e-39, -1e-39, 5e-40, 0.0] * 16, device=DEVICE)
    on_midpoints = torch.cat([mid, torch.ones(1, device=DEVICE), torch.zeros(48, device=DEVICE)])  # absmax 1
    rest = _weight((3 * 64 + 5,), torch.float32, seed=9)
    w = torch.cat([torch.zeros(64, device=DEVICE), tiny, on_midpoints, rest])
    assert on_midpoints.numel() == 64 and w.numel() % 2 == 1
    packed, absmax = quantize_nf4_blocks(w, CODE4)
    ref = quantize_nf4_reference(w)
    assert torch.equal(packed, ref.packed)
    assert torch.equal(absmax, _first_level_absmax(w))
    # Zeros are code 7 in both nibbles; a value on a midpoint takes the lower code.
    assert torch.all(packed[:32] == 0x77)
    codes = torch.stack([packed >> 4, packed & 0xF], 1).view(-1)[128:143].long()
    assert torch.equal(codes, torch.arange(15, device=DEVICE))
    assert packed[-1] & 0xF == 7  # the pad nibble of the odd element count


def test_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4_blocks(torch.zeros(64, device=DEVICE), CODE4, blocksize=48)
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4_blocks(torch.zeros(0, device=DEVICE), CODE4)
