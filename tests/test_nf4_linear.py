"""The frozen NF4 linear layer against float64 references."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qlora_kit.modules.lora import NF4LoRALinear
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.quant.nf4 import dequantize_nf4_reference, quantize_nf4


def _layer(out_f=96, in_f=128, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) if bias else None
    return NF4Linear(quantize_nf4(w), b, compute_dtype=torch.float32), b


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_grad_match_float64(bias):
    layer, b = _layer(bias=bias)
    w64 = dequantize_nf4_reference(layer.nf4_weight).double()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ w64.t() + (b.double() if bias else 0)
    assert torch.allclose(y.double(), y64, rtol=1e-5, atol=1e-5)

    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def test_bf16_compute():
    w = torch.randn(64, 128) / 11
    layer = NF4Linear(quantize_nf4(w), None, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 128)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ dequantize_nf4_reference(layer.nf4_weight).double().t()
    assert (y.double() - ref).norm() / ref.norm() < 1e-2


def test_weight_is_frozen_and_only_packed_weight_is_kept():
    """No full-precision weight exists on the module, and autograd saves no weight-sized tensor."""
    layer, _ = _layer(out_f=256, in_f=256)
    assert not any(p.requires_grad for p in layer.parameters())
    assert {n for n, _ in layer.named_buffers()} == {
        "weight_packed",
        "weight_absmax_q",
        "weight_nested_absmax",
        "weight_offset",
    }
    assert all(buf.dtype in (torch.uint8, torch.float32) and buf.numel() <= 256 * 256 // 2 for buf in layer.buffers())

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x = torch.randn(2, 256, requires_grad=True)
        layer(x).sum().backward()
    assert all(t.numel() < 256 * 256 for t in saved)


def test_under_non_reentrant_checkpointing():
    layer, _ = _layer()
    lora = NF4LoRALinear(layer, r=4, alpha=8)
    torch.nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(2, 7, 128, requires_grad=True)
    out_plain = lora(x)
    out_plain.sum().backward()
    grads_plain = (x.grad.clone(), lora.lora_A.weight.grad.clone(), lora.lora_B.weight.grad.clone())
    x.grad = None
    lora.zero_grad()
    out_ckpt = checkpoint(lora, x, use_reentrant=False)
    out_ckpt.sum().backward()
    assert torch.equal(out_ckpt, out_plain)
    for a, b in zip(grads_plain, (x.grad, lora.lora_A.weight.grad, lora.lora_B.weight.grad)):
        assert torch.allclose(a, b)


def test_state_dict_round_trip():
    layer, b = _layer()
    fresh, _ = _layer(seed=1)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))


def test_rejects_non_2d_weight():
    with pytest.raises(ValueError, match="2-d"):
        NF4Linear(quantize_nf4(torch.randn(64)), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_path_equals_plain_lora(dtype):
    """LoRA on an NF4 base (one fused autograd function) against base(x) + scale*B(A(x)) by autograd."""
    torch.manual_seed(0)
    base = NF4Linear(quantize_nf4(torch.randn(96, 128) / 11), torch.randn(96), compute_dtype=dtype)
    lora = NF4LoRALinear(base, r=8, alpha=16)
    torch.nn.init.normal_(lora.lora_B.weight, std=0.1)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 96, dtype=dtype)

    lora(x).backward(g)
    fused = (x.grad.clone(), lora.lora_A.weight.grad.clone(), lora.lora_B.weight.grad.clone())

    x.grad = None
    lora.zero_grad()
    w = dequantize_nf4_reference(base.nf4_weight).to(dtype)
    a, b = lora.lora_A.weight, lora.lora_B.weight
    plain = x @ w.t() + base.bias + ((x @ a.to(dtype).t()) @ b.to(dtype).t()) * lora.scaling
    plain.backward(g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert torch.allclose(lora(x).detach(), plain.detach(), **tol)
    for ours, ref in zip(fused, (x.grad, a.grad, b.grad)):
        assert torch.allclose(ours, ref, **tol)


def test_kernel_choice_is_checked_once_for_every_op():
    """NF4Linear, dequantize_nf4 and the fused ops share one auto|triton|torch choice and its error."""
    from qlora_kit.modules.fused_ops import swiglu
    from qlora_kit.quant.nf4 import dequantize_nf4

    layer, _ = _layer()
    cpu = torch.ones(2, 4)
    for bad in (lambda: NF4Linear(layer.nf4_weight, kernel="cuda"), lambda: swiglu(cpu, cpu, kernel="cuda")):
        with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
            bad()
    with pytest.raises(ValueError, match="got 'cuda'"):
        dequantize_nf4(layer.nf4_weight, kernel="cuda")
    # auto on the CPU and torch anywhere: the torch reference, bit for bit
    for kernel in ("auto", "torch"):
        assert torch.equal(dequantize_nf4(layer.nf4_weight, kernel=kernel), dequantize_nf4_reference(layer.nf4_weight))
