"""On a CUDA GPU: our NF4 kernels against bitsandbytes' CUDA kernels, bit for bit (skipped elsewhere)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(4096, 4096), (1024, 576), (4097, 333), (28672, 1024), (7,)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_and_dequantize_match_bitsandbytes_cuda(shape, dtype):
    import bitsandbytes.functional as bnbF

    from qlora_kit.quant.nf4 import dequantize_nf4, from_bitsandbytes, quantize_nf4

    g = torch.Generator("cuda").manual_seed(sum(shape))
    rows = shape[0] if len(shape) > 1 else 1
    scale = torch.rand(rows, *([1] * (len(shape) - 1)), device="cuda", generator=g) * 2 + 0.01
    w = (torch.randn(shape, device="cuda", generator=g) * scale).to(dtype)

    packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    ours = quantize_nf4(w)
    _assert_codes_equal_up_to_rounding_at_midpoints(w, ours.packed, packed.view(-1))
    assert torch.equal(ours.nested_absmax, qs.state2.absmax)
    assert torch.equal(ours.offset, qs.offset)
    # 8-bit absmax codes: identical except at exact midpoint ties, which bitsandbytes' binary search
    # breaks toward its last pivot, and in all-zero nested blocks (any zero code decodes the same).
    differ = (ours.absmax_q != qs.absmax).nonzero().view(-1)
    if differ.numel():
        absmax = w.float().reshape(-1).abs()
        absmax = torch.nn.functional.pad(absmax, (0, -absmax.numel() % 64)).view(-1, 64).amax(1)
        centred = (absmax - absmax.mean())[differ]
        nested = qs.state2.absmax[differ // 256]
        scaled = centred * (1.0 / nested.clamp(min=1e-38))
        code = qs.state2.code
        d_ours, d_bnb = (
            (scaled - code[ours.absmax_q[differ].long()]).abs(),
            (scaled - code[qs.absmax[differ].long()]).abs(),
        )
        tie = (d_ours - d_bnb).abs() <= 1e-7 * scaled.abs().clamp(min=1)
        assert torch.all(tie | (nested == 0)), (
            f"{differ.numel()} of {ours.absmax_q.numel()} absmax codes differ; first: scaled={scaled[:4].tolist()} "
            f"ours={ours.absmax_q[differ][:4].tolist()} bnb={qs.absmax[differ][:4].tolist()}"
        )

    expected = bnbF.dequantize_4bit(packed, qs)
    assert torch.equal(dequantize_nf4(from_bitsandbytes(packed, qs)), expected)


def _assert_codes_equal_up_to_rounding_at_midpoints(w, ours, theirs):
    """4-bit codes must match, except for values within a few ulps of a midpoint between two codes:
    there bitsandbytes' CUDA reciprocal (fast-math) and our correctly rounded one may round apart."""
    from qlora_kit.quant.nf4 import NF4_CODE

    def codes(packed):
        return torch.stack([packed >> 4, packed & 0xF], 1).view(-1)[: w.numel()].long()

    a, b = codes(ours), codes(theirs)
    differ = (a != b).nonzero().view(-1)
    if differ.numel() == 0:
        return
    x = w.float().reshape(-1)
    absmax = torch.nn.functional.pad(x.abs(), (0, -x.numel() % 64)).view(-1, 64).amax(1)
    scaled = x[differ] / absmax[differ // 64]
    table = torch.tensor(NF4_CODE, device=w.device)
    midpoint = (table[a[differ]] + table[b[differ]]) / 2
    assert torch.all((a[differ] - b[differ]).abs() == 1)
    assert torch.all((scaled - midpoint).abs() <= 4e-7), (
        f"{differ.numel()} of {w.numel()} codes differ away from a midpoint: {scaled[:4].tolist()} vs {midpoint[:4].tolist()}"
    )


def test_nf4_linear_on_gpu_matches_float64():
    from qlora_kit.modules.nf4_linear import NF4Linear
    from qlora_kit.quant.nf4 import dequantize_nf4_reference, quantize_nf4

    w = torch.randn(1024, 2048, device="cuda") / 45
    layer = NF4Linear(quantize_nf4(w), None, compute_dtype=torch.bfloat16)
    x = torch.randn(8, 2048, device="cuda", requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    w64 = dequantize_nf4_reference(layer.nf4_weight).double()
    ref = x.detach().double() @ w64.t()
    assert (y.double() - ref).norm() / ref.norm() < 1e-2
    grad_ref = torch.ones(8, 1024, device="cuda", dtype=torch.float64) @ w64
    assert (x.grad.double() - grad_ref).norm() / grad_ref.norm() < 1e-2
