"""NF4 + double quantization against bitsandbytes (the reference implementation) on the CPU."""

import zlib

import bitsandbytes.functional as bnbF
import pytest
import torch

from qlora_kit.quant.nf4 import (
    NF4_CODE,
    dequantize_absmax,
    dequantize_nf4_reference,
    from_bitsandbytes,
    load_nf4,
    nf4_from_state_dict,
    quantize_nf4,
    quantize_nf4_reference,
    save_nf4,
    signed_dynamic_map,
)

SHAPES = [(64, 64), (100, 70), (3, 5), (7,), (1000, 333), (4096, 576), (300, 257), (1, 63), (257 * 64 + 1,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rows = shape[0] if len(shape) > 1 else 1
    # Per-row scales spread the absmax values, so the nested 8-bit map is exercised across its range.
    scale = torch.rand(rows, *([1] * (len(shape) - 1)), generator=g) * 3 + 0.01
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def test_code_tables_match_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_CODE), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(signed_dynamic_map(), bnbF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes(shape, dtype):
    # crc32, not hash(): str hashes change with each process (PYTHONHASHSEED), and so would the weight.
    w = _weight(shape, dtype, seed=zlib.crc32(repr((shape, str(dtype))).encode()))
    packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    ours = quantize_nf4(w)

    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.nested_absmax, qs.state2.absmax)
    assert torch.equal(ours.offset, qs.offset)
    assert ours.shape == w.shape and ours.dtype == w.dtype

    # The 8-bit absmax codes: ours are always the nearest code of the dynamic map.
    # bitsandbytes' CPU library uses an approximate binary search that sometimes lands a
    # few codes off; where its code is the nearest one, ours must be identical to it.
    first_level = w.reshape(-1).float()
    n = first_level.numel()
    blocks = torch.nn.functional.pad(first_level.abs(), (0, (-n) % 64)).view(-1, 64).amax(1)
    centred = blocks - blocks.mean()
    # A nested block whose absmax values all equal their mean is all zeros: any zero code is right.
    nested_absmax = qs.state2.absmax.clamp(min=1e-38).repeat_interleave(256)[: centred.numel()]
    scaled = centred / nested_absmax
    dyn = signed_dynamic_map()
    dist = (scaled[:, None] - dyn[None, :]).abs()
    ours_dist = dist.gather(1, ours.absmax_q.long()[:, None]).squeeze(1)
    bnb_dist = dist.gather(1, qs.absmax.long()[:, None]).squeeze(1)
    assert torch.all(ours_dist <= dist.min(1).values + 1e-7)
    two_nearest = dist.topk(2, dim=1, largest=False).values
    clear_winner = two_nearest[:, 1] - two_nearest[:, 0] > 1e-6  # not within rounding of a midpoint
    bnb_nearest = (bnb_dist <= two_nearest[:, 0] + 1e-7) & clear_winner
    assert torch.equal(ours.absmax_q[bnb_nearest], qs.absmax[bnb_nearest])
    if bnb_nearest.numel() >= 256:
        assert bnb_nearest.float().mean() > 0.98


@pytest.mark.parametrize("dtype", DTYPES)
# bitsandbytes 0.50.2's CPU dequantize kernel misplaces blocks when an even row length is not a
# multiple of 64 (e.g. 96; its own pure-PyTorch backend and the CUDA kernel agree with us there),
# so the comparison uses row lengths it handles: multiples of 64, or odd lengths (its torch fallback).
@pytest.mark.parametrize("shape", [(100, 70), (3, 5), (1000, 333), (257 * 64 + 1,), (128, 128), (40, 576)])
def test_dequantize_bitsandbytes_state_exactly(shape, dtype):
    """A weight quantized by bitsandbytes imports without requantizing and dequantizes to the same bits."""
    w = _weight(shape, dtype, seed=7)
    packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    imported = from_bitsandbytes(packed, qs)
    expected = bnbF.dequantize_4bit(packed, qs)
    assert torch.equal(dequantize_nf4_reference(imported), expected)
    for out_dtype in DTYPES:
        assert torch.equal(dequantize_nf4_reference(imported, out_dtype), expected.float().to(out_dtype)) or (
            out_dtype != dtype
        )


def test_dequantize_against_float64():
    """Dequantization is code[nibble] * (map[absmax_q] * nested_absmax + offset), computed independently."""
    w = _weight((130, 64), torch.float32, seed=3)
    t = quantize_nf4(w)
    nib = torch.stack([t.packed >> 4, t.packed & 0xF], 1).view(-1).long()
    absmax = (
        signed_dynamic_map().double()[t.absmax_q.long()]
        * t.nested_absmax.double().repeat_interleave(256)[: t.absmax_q.numel()]
        + t.offset.double()
    )
    ref = torch.tensor(NF4_CODE, dtype=torch.float64)[nib] * absmax.repeat_interleave(64)
    # fp32 rounding of `centred + offset` is relative to the offset, not to the (possibly small) sum.
    tol = 4 * torch.finfo(torch.float32).eps * t.offset.item()
    assert torch.allclose(dequantize_absmax(t).double(), absmax, rtol=1e-6, atol=tol)
    assert torch.allclose(dequantize_nf4_reference(t).double().view(-1), ref, rtol=1e-6, atol=tol)


def test_quantization_error_is_bounded():
    w = _weight((256, 256), torch.float32, seed=11)
    t = quantize_nf4(w)
    d = dequantize_nf4_reference(t)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    absmax_dq = dequantize_absmax(t)[:, None]
    # |c*a' - s*a| <= |a' - a| + a*|c - s|, and |c - s| <= half the widest NF4 gap, (-0.696 - -1)/2.
    bound = (absmax_dq - absmax).abs() + absmax * (NF4_CODE[1] - NF4_CODE[0]) / 2
    assert torch.all((d - w).view(-1, 64).abs() <= bound + 1e-6)
    # The double-quantized absmax is within one step of the 8-bit map around the offset.
    assert torch.all((absmax_dq - absmax).abs() <= 0.02 * t.nested_absmax.max())


def test_safetensors_round_trip(tmp_path):
    weights = {
        "model.layers.0.q_proj.weight": quantize_nf4(_weight((96, 64), torch.bfloat16, 1)),
        "lm.weight": quantize_nf4(_weight((33,), torch.float16, 2)),
    }
    path = tmp_path / "w.safetensors"
    save_nf4(weights, str(path))
    loaded = load_nf4(str(path))
    assert set(loaded) == set(weights)
    for name, t in weights.items():
        assert torch.equal(dequantize_nf4_reference(loaded[name]), dequantize_nf4_reference(t))
        assert loaded[name].shape == t.shape and loaded[name].dtype == t.dtype


def test_state_dict_is_readable_by_bitsandbytes():
    """Our serialized keys are bitsandbytes' QuantState layout: its own from_dict reads them."""
    from qlora_kit.quant.nf4 import nf4_state_dict

    w = _weight((128, 128), torch.bfloat16, 5)
    t = quantize_nf4(w)
    sd = nf4_state_dict(t, "weight")
    qs = bnbF.QuantState.from_dict({k[len("weight.") :]: v for k, v in sd.items() if k != "weight"}, device="cpu")
    assert torch.equal(bnbF.dequantize_4bit(sd["weight"], qs), dequantize_nf4_reference(t))
    assert torch.equal(nf4_from_state_dict(sd).packed, t.packed)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="int32"):
        quantize_nf4(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(0, 4))
    with pytest.raises(KeyError, match="missing"):
        nf4_from_state_dict({"weight": torch.zeros(2, dtype=torch.uint8)})


def test_reference_and_dispatch_agree_on_cpu():
    w = _weight((64, 128), torch.float32, 9)
    a, b = quantize_nf4(w), quantize_nf4_reference(w)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax_q, b.absmax_q)
