"""The shared int-k grid against a float64 loop written from docs/formats.md."""

import pytest
import torch

from qlora_kit.quant.intq import IntQuantWeight, find_params, quantize_dequantize, rtn_quantize


def reference_rtn(weight, bits, group_size, symmetric):
    """Plain loops over rows and groups, float64: (codes, scale, zero, ratio w/scale)."""
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    maxq = 2**bits - 1
    w = weight.double()
    q = torch.zeros(n, k, dtype=torch.float64)
    ratio = torch.zeros(n, k, dtype=torch.float64)
    scale = torch.zeros(n, k // g, dtype=torch.float64)
    zero = torch.zeros(n, k // g, dtype=torch.float64)
    for r in range(n):
        for j in range(k // g):
            grp = w[r, j * g : (j + 1) * g]
            if symmetric:
                m = grp.abs().max().item()
                s = 2 * (m if m > 0 else 1.0) / maxq
                z = 2 ** (bits - 1)
            else:
                s = max(grp.max().item() - grp.min().item(), 1e-5) / maxq
                z = min(max(-round(grp.min().item() / s), 0), maxq)
            scale[r, j], zero[r, j] = s, z
            for c in range(g):
                t = grp[c].item() / s
                ratio[r, j * g + c] = t
                q[r, j * g + c] = min(max(round(t) + z, 0), maxq)
    return q, scale, zero, ratio


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [16, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_float64_reference(bits, group_size, symmetric):
    torch.manual_seed(bits * 10 + group_size)
    weight = torch.randn(6, 48)
    w = rtn_quantize(weight, bits=bits, group_size=group_size, symmetric=symmetric)
    q, scale, zero, ratio = reference_rtn(weight, bits, group_size, symmetric)

    groups = 1 if group_size == -1 else 48 // group_size
    assert w.q.dtype == torch.uint8 and w.q.shape == (6, 48)
    assert w.scale.dtype == torch.float32 and w.scale.shape == (6, groups)
    assert w.zero.dtype == torch.uint8 and w.zero.shape == (6, groups)
    assert w.g_idx.dtype == torch.int32
    assert torch.equal(w.g_idx.long(), torch.arange(48) // (48 // groups))
    torch.testing.assert_close(w.scale.double(), scale, rtol=1e-6, atol=0)
    assert torch.equal(w.zero.double(), zero)
    # Codes agree everywhere but at exact rounding ties, where fp32 and fp64 may part
    # (w = -max|w| in the symmetric grid sits on one: -7.5 for 4 bits).
    tie = ((ratio - ratio.floor()) - 0.5).abs() < 1e-5
    assert torch.equal(w.q.double()[~tie], q[~tie])
    assert (w.q.double() - q).abs().max() <= 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_is_scale_times_code_minus_zero_and_within_half_a_step(symmetric):
    torch.manual_seed(1)
    weight = torch.randn(5, 64)
    w = rtn_quantize(weight, bits=4, group_size=32, symmetric=symmetric)
    deq = w.dequantize(torch.float64)
    for r in range(5):
        for c in range(64):
            gi = c // 32
            expected = w.scale[r, gi].double() * (int(w.q[r, c]) - int(w.zero[r, gi]))
            assert deq[r, c].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-12)
    step = w.scale.double().repeat_interleave(32, dim=1)
    assert ((deq - weight.double()).abs() <= step / 2 * (1 + 1e-5)).all()
    assert w.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_quantize_dequantize_matches_rtn_rows():
    torch.manual_seed(2)
    weight = torch.randn(4, 32)
    scale, zero = find_params(weight, bits=4, symmetric=False)
    assert scale.shape == (4, 1) and zero.shape == (4, 1)
    expected = rtn_quantize(weight, bits=4, group_size=-1, symmetric=False).dequantize()
    torch.testing.assert_close(quantize_dequantize(weight, scale, zero, 4), expected, rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group_is_finite_and_exact(symmetric):
    weight = torch.randn(3, 32)
    weight[1, :16] = 0
    weight[2] = 0
    w = rtn_quantize(weight, bits=4, group_size=16, symmetric=symmetric)
    assert torch.isfinite(w.scale).all() and (w.scale > 0).all()
    deq = w.dequantize()
    assert torch.isfinite(deq).all()
    assert (deq[1, :16] == 0).all() and (deq[2] == 0).all()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="K=100"):
        rtn_quantize(torch.randn(4, 100), group_size=64)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
        rtn_quantize(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(torch.randn(4, 64), bits=9, group_size=32)
    bad = torch.randn(2, 32)
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        rtn_quantize(bad, group_size=32)
    with pytest.raises(ValueError, match="g_idx"):
        IntQuantWeight(
            q=torch.zeros(2, 8, dtype=torch.uint8),
            scale=torch.ones(2, 1),
            zero=torch.zeros(2, 1, dtype=torch.uint8),
            g_idx=torch.zeros(4, dtype=torch.int32),
            bits=4,
            group_size=-1,
            symmetric=False,
        )
