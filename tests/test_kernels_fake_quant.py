"""The one-pass QAT kernel (kernels/fake_quant.py) against the torch fake-quant path.

The reference is the exporter's grid applied to the merged weight the merge computes,
fq(dequant_reference(W) + scale * B @ A) (qlora_kit.modules.fake_quant, itself checked
bit for bit against RTN in test_fake_quant.py). The kernel sums the r terms of B @ A in
its own order, so a merged value can differ by an ulp and, where that crosses a rounding
tie, its code by one step: the test compares integer codes, allowing that for a few
elements in ten thousand, and the values of equal codes to a few ulps.
Runs under the Triton interpreter on the CPU (small sizes).
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run here")

from qlora_kit.kernels.fake_quant import fake_quant_merged_nf4, supports  # noqa: E402
from qlora_kit.modules.fake_quant import FakeQuantConfig, quantize_dequantize_weight  # noqa: E402
from qlora_kit.quant.intq import find_params  # noqa: E402
from qlora_kit.quant.nf4 import dequantize_nf4_reference, dynamic_map, nf4_code, quantize_nf4  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(n, k, r, seed, shift_rows=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / 8
    w[:shift_rows] += 1.0  # groups on one side of zero: the asymmetric grid clamps their zero
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) / 10
    return quantize_nf4(w.to(DEVICE)), a.to(DEVICE), b.to(DEVICE)


def _reference(t, a, b, scaling, cfg):
    # On the CPU: torch's CUDA division by a Python scalar multiplies by its reciprocal, which
    # can move a group's scale by an ulp; the kernel and the CPU both divide (IEEE).
    t, a, b = t.to("cpu"), a.cpu(), b.cpu()
    merged = dequantize_nf4_reference(t, torch.float32) + scaling * (b.float() @ a.float())
    w_q, keep = quantize_dequantize_weight(merged, cfg)
    step = find_params(merged.reshape(-1, cfg.group_size), cfg.bits, cfg.symmetric)[0]
    keep = None if keep is None else keep.to(DEVICE)
    return w_q.to(DEVICE), keep, step.expand(-1, cfg.group_size).reshape(merged.shape).to(DEVICE)


def _run(t, a, b, scaling, cfg, dtype):
    return fake_quant_merged_nf4(
        t.packed,
        t.absmax_q,
        t.nested_absmax,
        t.offset,
        nf4_code(t.device),
        dynamic_map(t.device),
        a,
        b,
        scaling,
        cfg.bits,
        cfg.group_size,
        cfg.symmetric,
        dtype,
    )


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(
    "n,k,r,group_size,bits",
    [(48, 128, 4, 64, 4), (70, 64, 16, 16, 3), (33, 256, 20, 128, 4), (64, 128, 8, 32, 8)],
)
def test_kernel_matches_the_torch_path(n, k, r, group_size, bits, symmetric):
    cfg = FakeQuantConfig("int", bits, group_size, symmetric)
    t, a, b = _case(n, k, r, seed=n + k + r, shift_rows=3)
    scaling = 2.0
    ref, keep, step = _reference(t, a, b, scaling, cfg)

    out, clipped = _run(t, a, b, scaling, cfg, torch.float32)
    # Compared on the grid: every value is step * (code - zero). The kernel and the torch path
    # form it by different float32 operations, and under the interpreter tl.dot is numpy's BLAS,
    # whose summation order depends on the CPU kernel OpenBLAS picks: equal codes can differ by
    # ulps, and an ulp that crosses a rounding tie moves a code by one step.
    code, ref_code = out / step, ref / step
    assert (code - code.round()).abs().max() < 1e-3, "the kernel's values are not on the grid"
    code, ref_code = code.round(), ref_code.round()
    moved = code != ref_code
    assert moved.float().mean() < 1e-3
    assert (code - ref_code).abs().max() <= 1  # one grid step, no more
    torch.testing.assert_close(out[~moved], ref[~moved], rtol=1e-6, atol=1e-6 * step.abs().max().item())
    if symmetric:
        assert clipped is None and keep is None
    else:
        assert keep is not None and clipped.item() == (~keep).sum().item() > 0

    out_bf16, _ = _run(t, a, b, scaling, cfg, torch.bfloat16)
    assert torch.equal(out_bf16, out.bfloat16())  # the same grid values, rounded once to bf16


def test_kernel_takes_bf16_adapters():
    cfg = FakeQuantConfig("int", 4, 64, True)
    t, a, b = _case(32, 128, 8, seed=3)
    a, b = a.bfloat16(), b.bfloat16()
    ref, _, _ = _reference(t, a, b, 0.5, cfg)
    out, _ = _run(t, a, b, 0.5, cfg, torch.float32)
    assert ((out - ref).abs() > 1e-6 * ref.abs().max()).float().mean() < 1e-3


def test_supported_group_sizes():
    assert supports(4096, 128) and supports(576, 64)
    assert not supports(576, 128)  # does not divide
    assert not supports(4096, -1) and not supports(4096, 96)  # per-row and non-power-of-two: torch path


def test_kernel_rejects_mismatched_shapes():
    cfg = FakeQuantConfig("int", 4, 64, True)
    t, a, b = _case(32, 128, 8, seed=4)
    with pytest.raises(ValueError, match="do not fit together"):
        _run(t, a[:, :64], b, 1.0, cfg, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the QAT layer takes the kernel path on CUDA only")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_qat_layer_on_the_kernel_path_follows_the_chain_rule(symmetric):
    """The layer's forward and STE gradients on CUDA, against float64 on the CPU reference weight."""
    from qlora_kit.modules.lora import LoRALinear
    from qlora_kit.modules.nf4_linear import NF4Linear
    from qlora_kit.modules.qat_lora import enable_qat

    torch.manual_seed(0)
    cfg = FakeQuantConfig("int", 4, 128, symmetric)
    t, _, _ = _case(256, 512, 16, seed=5, shift_rows=2)
    layer = LoRALinear(NF4Linear(t, compute_dtype=torch.bfloat16), r=16, alpha=32)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    enable_qat(layer, cfg)
    x = torch.randn(4, 64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    y.backward(grad_out)

    a, b, s = layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.scaling
    w_q, keep, _ = _reference(t, a, b, s, cfg)
    w, keep = w_q.double(), 1.0 if keep is None else keep.double()
    x64, g = x.detach().double().reshape(-1, 512), grad_out.double().reshape(-1, 256)
    grad_w = keep * (g.t() @ x64)  # through the STE to the merged weight
    expected = (x64 @ w.t(), g @ w, s * b.double().t() @ grad_w, s * grad_w @ a.double().t())
    for got, want in zip(
        (y.reshape(-1, 256), x.grad.reshape(-1, 512), layer.lora_A.weight.grad, layer.lora_B.weight.grad), expected
    ):
        assert (got.double() - want).norm() <= 1e-2 * want.norm()
