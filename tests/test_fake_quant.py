"""Fake-quant with the straight-through estimator, and QAT on the LoRA linear.

Forward values are checked bit for bit against the exporters (intq.rtn_quantize, the NF4
reference), the STE pass mask against one written out by hand from the exporters' stored
group parameters, and the QAT linear's gradients against the STE chain rule in float64.
"""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_kit.modules.fake_quant import FakeQuantConfig, quantize_dequantize_activation, quantize_dequantize_weight
from qlora_kit.modules.lora import LoRALinear
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.modules.qat_lora import QATLoRALinear, cached_qat_weights, enable_qat, set_qat_active
from qlora_kit.quant.intq import rtn_quantize
from qlora_kit.quant.nf4 import dequantize_nf4_reference, quantize_nf4, quantize_nf4_reference


def _weight(n=8, k=64, seed=0):
    """Gaussian rows, plus rows shifted to one side of zero (asymmetric groups that clip)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / 8
    w[0] += 1.0
    w[1] -= 1.0
    return w


def _rtn(w, cfg):
    """The exporter's dequantized weight and the STE pass mask, from its stored scale and zero."""
    qw = rtn_quantize(w.float(), cfg.bits, cfg.group_size, cfg.symmetric)
    g_idx = qw.g_idx.long()
    scale, zero = qw.scale[:, g_idx], qw.zero.float()[:, g_idx]
    # docs/formats.md: q = clamp(round(w/scale) + zero, 0, 2^bits-1). Clipped: the clamp moved the
    # code in a group whose grid does not reach its own range, i.e. whose zero the
    # asymmetric grid had to clamp (the symmetric grid always reaches +-max|w|).
    maxq = 2**cfg.bits - 1
    code = torch.round(w.float() / scale) + zero
    groups = w.float().reshape(w.shape[0], -1, w.shape[1] if cfg.group_size == -1 else cfg.group_size)
    zero_raw = -torch.round(groups.amin(dim=2, keepdim=True).expand_as(groups).reshape(w.shape) / scale)
    reaches = torch.full_like(code, cfg.symmetric, dtype=torch.bool) | ((zero_raw >= 0) & (zero_raw <= maxq))
    return qw.dequantize(), reaches | ((code >= 0) & (code <= maxq))


def _activation_reference(x, bits):
    """Per-token symmetric absmax quantize-dequantize in float64: (values, codes w/scale)."""
    x = x.double()
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax / (2 ** (bits - 1) - 1))
    return torch.round(x / scale) * scale, x / scale


# --- fake-quant of one tensor ---------------------------------------------------------

INT_CONFIGS = [
    FakeQuantConfig("int", bits, group_size, symmetric)
    for bits in (3, 4, 8)
    for group_size in (16, -1)
    for symmetric in (True, False)
]


@pytest.mark.parametrize("cfg", INT_CONFIGS, ids=str)
def test_int_forward_is_the_exporter_grid_and_mask_is_the_clip_mask(cfg):
    w = _weight()
    w_q, keep = quantize_dequantize_weight(w, cfg)
    ref, mask = _rtn(w, cfg)
    assert torch.equal(w_q, ref)
    assert torch.equal(torch.ones_like(mask) if keep is None else keep, mask)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int_clip_mask_is_where_the_docstring_says(symmetric):
    """Symmetric: nothing, though the clamp brings back +max|w|. Asymmetric: groups on one side of 0."""
    cfg = FakeQuantConfig("int", 4, 16, symmetric)
    w = _weight(n=64, k=64)
    _, mask = _rtn(w, cfg)
    clipped = ~mask.view(64, 4, 16)
    qw = rtn_quantize(w, cfg.bits, cfg.group_size, cfg.symmetric)
    if symmetric:
        assert not clipped.any()
        assert (torch.round(w / qw.scale.repeat_interleave(16, dim=1)) == 8).any()  # the tie the clamp fixes
        assert quantize_dequantize_weight(w, cfg)[1] is None
    else:
        assert clipped[:2].any(dim=2).all()  # the rows shifted off zero clip in every group
        assert not clipped[2:].any()  # Gaussian groups straddle zero
        assert torch.equal(quantize_dequantize_weight(w, cfg)[1], mask)


def test_int_bf16_weight_keeps_its_dtype():
    cfg = FakeQuantConfig("int", 4, 32, False)
    w = _weight().bfloat16()
    w_q, _ = quantize_dequantize_weight(w, cfg)
    assert torch.equal(w_q, rtn_quantize(w, 4, 32, False).dequantize(torch.bfloat16))


def test_values_on_the_grid_pass_unchanged():
    """Asymmetric grid values (power-of-two scales, both end codes in every group) are fixed points."""
    cfg = FakeQuantConfig("int", 4, 16, symmetric=False)
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (6, 4, 16), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    zero = torch.randint(0, 16, (6, 4, 1), generator=g).float()
    scale = 2.0 ** -torch.randint(2, 8, (6, 4, 1), generator=g).float()
    w = (scale * (q - zero)).reshape(6, 64)

    w_q, keep = quantize_dequantize_weight(w, cfg)
    assert torch.equal(w_q, w)
    assert torch.equal(quantize_dequantize_weight(w_q, cfg)[0], w_q)
    assert keep.all()  # the grid reaches both ends of every group: nothing clipped


@pytest.mark.parametrize("shape", [(7, 9), (3, 100), (160, 128)])  # partial block; > 256 blocks
def test_nf4_forward_is_the_reference_and_nothing_is_clipped(shape):
    w = torch.randn(shape)
    w_q, keep = quantize_dequantize_weight(w, FakeQuantConfig("nf4"))
    assert torch.equal(w_q, dequantize_nf4_reference(quantize_nf4_reference(w)))
    assert keep is None


def test_nf4_codes_are_a_fixed_point():
    """A second pass keeps every 4-bit code; only the double-quantized absmax moves, slightly."""
    cfg = FakeQuantConfig("nf4")
    for seed in range(5):
        w = torch.randn(160, 128, generator=torch.Generator().manual_seed(seed))
        once, _ = quantize_dequantize_weight(w, cfg)
        twice, _ = quantize_dequantize_weight(once, cfg)
        assert torch.equal(quantize_nf4_reference(once).packed, quantize_nf4_reference(w).packed)
        assert torch.equal(quantize_nf4_reference(twice).packed, quantize_nf4_reference(w).packed)
        # The re-derived absmax is double-quantized again and may land one step of the 8-bit
        # dynamic map away: up to ~1.5% of the nested absmax near the map's ends.
        assert ((twice - once).abs() <= 2e-2 * once.abs()).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_activation_matches_float64_per_token(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 64, generator=g) * torch.logspace(-3, 2, 5)[:, None]  # varied token scales
    x[1, 2] = 0  # an all-zero token
    x_q = quantize_dequantize_activation(x, bits)
    ref, ratio = _activation_reference(x, bits)

    # float32 and float64 may round differently only at a tie (ratio k + 1/2).
    near_tie = (ratio - ratio.floor() - 0.5).abs() < 1e-4
    absmax = x.double().abs().amax(dim=-1, keepdim=True)
    close = (x_q.double() - ref).abs() <= 1e-6 * absmax
    assert (close | near_tie).all() and close.float().mean() > 0.99
    assert torch.equal(x_q[1, 2], torch.zeros(64))
    assert (ratio.abs() <= 2 ** (bits - 1) - 1 + 1e-9).all()  # per-token absmax clips nothing


def test_activation_keeps_dtype():
    x = torch.randn(4, 32).bfloat16()
    x_q = quantize_dequantize_activation(x, 8)
    assert x_q.dtype == torch.bfloat16
    assert torch.equal(x_q, quantize_dequantize_activation(x.float(), 8).bfloat16())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"format": "fp8"}, "format"),
        ({"format": "nf4", "bits": 3}, "bits"),
        ({"bits": 9}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"activation_bits": 16}, "activation_bits"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FakeQuantConfig(**kwargs)


def test_int_rejects_group_size_not_dividing_in_features():
    with pytest.raises(ValueError, match="group_size"):
        quantize_dequantize_weight(torch.randn(4, 48), FakeQuantConfig(group_size=32))


# --- QAT on the LoRA linear -------------------------------------------------------------

QAT_CONFIGS = [
    FakeQuantConfig("int", 4, 32, symmetric=True),
    FakeQuantConfig("int", 4, 32, symmetric=False),
    FakeQuantConfig("int", 3, -1, symmetric=False, activation_bits=8),
    FakeQuantConfig("nf4"),
    FakeQuantConfig("nf4", activation_bits=8),
]


def _lora(out_f=48, in_f=128, nf4=True, seed=0):
    """LoRA (r=4, random B) on a base whose first rows lie off zero, so asymmetric groups clip."""
    torch.manual_seed(seed)
    w = _weight(out_f, in_f, seed)
    bias = torch.randn(out_f)
    if nf4:
        base = NF4Linear(quantize_nf4(w), bias, compute_dtype=torch.float32)
    else:
        base = nn.Linear(in_f, out_f)
        base.weight.data, base.bias.data = w, bias
    lora = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight, std=0.05)
    return lora, bias


def _base_weight(lora):
    if isinstance(lora.base, NF4Linear):
        return dequantize_nf4_reference(lora.base.nf4_weight).float()
    return lora.base.weight.detach()


def _qat_reference(lora, cfg, x, grad_out):
    """The exported weight (float32), then forward and the STE chain rule by hand in float64."""
    merged = _base_weight(lora) + lora.delta_weight().detach()  # what the merge exports
    if cfg.format == "nf4":
        w_q, mask = dequantize_nf4_reference(quantize_nf4_reference(merged)), torch.ones_like(merged, dtype=torch.bool)
    else:
        w_q, mask = _rtn(merged, cfg)
    x_q = x.double() if cfg.activation_bits is None else _activation_reference(x, cfg.activation_bits)[0]
    w64, a, b, s = w_q.double(), lora.lora_A.weight.double(), lora.lora_B.weight.double(), lora.scaling
    g = grad_out.double().reshape(-1, w64.shape[0])
    y = x_q @ w64.t() + lora.base.bias.double()
    grad_w = mask * (g.t() @ x_q.reshape(-1, w64.shape[1]))  # dL/d merged weight through the STE
    return w_q, y, grad_out.double() @ w64, s * b.t() @ grad_w, s * grad_w @ a.t()


def _close(a, b):
    return (a.double() - b).norm() <= 1e-5 * b.norm()


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4-base", "linear-base"])
@pytest.mark.parametrize("cfg", QAT_CONFIGS, ids=str)
def test_qat_forward_and_grads_match_the_exporter_and_chain_rule(cfg, nf4):
    lora, _ = _lora(nf4=nf4)
    enable_qat(lora, cfg)
    x = torch.randn(2, 7, 128, requires_grad=True)
    y = lora(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    w_q, y_ref, dx, da, db = _qat_reference(lora, cfg, x.detach(), grad_out)

    if cfg.activation_bits is None:  # the same float32 matmul on the exporter's weight
        assert torch.equal(y, x.detach() @ w_q.t() + lora.base.bias.detach())
    assert _close(y, y_ref)
    assert _close(x.grad, dx)
    assert _close(lora.lora_A.weight.grad, da)
    assert _close(lora.lora_B.weight.grad, db)
    if not nf4:
        assert lora.base.weight.grad is None  # the base stays frozen in QAT mode


@pytest.mark.parametrize("cfg", [QAT_CONFIGS[1], QAT_CONFIGS[4]], ids=str)
def test_qat_in_bf16_compute(cfg):
    lora, _ = _lora()
    lora.base = NF4Linear(lora.base.nf4_weight, lora.base.bias, compute_dtype=torch.bfloat16)
    enable_qat(lora, cfg)
    x = torch.randn(2, 7, 128).bfloat16().requires_grad_()
    y = lora(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    _, y_ref, dx, da, db = _qat_reference(lora, cfg, x.detach(), grad_out)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and lora.lora_A.weight.grad.dtype == torch.float32
    for got, ref in ((y, y_ref), (x.grad, dx), (lora.lora_A.weight.grad, da), (lora.lora_B.weight.grad, db)):
        assert (got.double() - ref).norm() <= 2e-2 * ref.norm()


def test_qat_ignores_autocast():
    """Under autocast B @ A would run in bf16; the fake-quantized weight must stay the exporter's."""
    lora, _ = _lora()
    enable_qat(lora, QAT_CONFIGS[0])
    x = torch.randn(2, 7, 128, requires_grad=True)
    params = (x, lora.lora_A.weight, lora.lora_B.weight)
    y = lora(x)
    grads = torch.autograd.grad(y.sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_autocast = lora(x)
        grads_autocast = torch.autograd.grad(y_autocast.sum(), params)
    assert torch.equal(y_autocast, y)
    for a, b in zip(grads, grads_autocast):
        assert torch.equal(a, b)


def test_qat_inactive_is_plain_lora_exactly():
    lora, _ = _lora()
    x = torch.randn(2, 5, 128, requires_grad=True)

    def run():
        x.grad, lora.lora_A.weight.grad, lora.lora_B.weight.grad = None, None, None
        y = lora(x)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad, lora.lora_A.weight.grad, lora.lora_B.weight.grad

    plain = run()
    enable_qat(lora, FakeQuantConfig("int", 4, 32), active=False)
    for a, b in zip(plain, run()):
        assert torch.equal(a, b)
    set_qat_active(lora, True)
    assert not torch.equal(run()[0], plain[0])
    set_qat_active(lora, False)
    for a, b in zip(plain, run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", [QAT_CONFIGS[1], QAT_CONFIGS[4]], ids=str)
def test_qat_under_non_reentrant_checkpointing(cfg):
    lora, _ = _lora()
    enable_qat(lora, cfg)
    x = torch.randn(2, 7, 128, requires_grad=True)
    params = (x, lora.lora_A.weight, lora.lora_B.weight)
    y = lora(x)
    grads = torch.autograd.grad(y.sum(), params)
    y_ckpt = checkpoint(lora, x, use_reentrant=False)
    grads_ckpt = torch.autograd.grad(y_ckpt.sum(), params)
    assert torch.equal(y_ckpt, y)
    for a, b in zip(grads, grads_ckpt):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", [QAT_CONFIGS[1], QAT_CONFIGS[4]], ids=str)
def test_qat_saves_only_x_and_the_adapter(cfg):
    """No weight-sized tensor (merged weight, fake-quant, mask) is kept for backward: x, A, B, x @ A^T."""
    lora, _ = _lora(out_f=256, in_f=128)
    enable_qat(lora, cfg)
    x = torch.randn(3, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora(x)
    params = {x.data_ptr(), lora.lora_A.weight.data_ptr(), lora.lora_B.weight.data_ptr()}
    assert params <= {t.data_ptr() for t in saved}
    assert sorted(t.numel() for t in saved if t.data_ptr() not in params) == [3 * lora.r]
    y.sum().backward()
    assert lora.lora_A.weight.grad is not None


def test_enable_qat_and_switch_on_a_model():
    model = nn.Sequential(_lora()[0], nn.ReLU(), _lora(out_f=128, in_f=48, nf4=False)[0])
    cfg = FakeQuantConfig("int", 4, 16)
    with pytest.raises(ValueError, match="call enable_qat"):
        set_qat_active(model, True)
    assert enable_qat(model, cfg, active=False) == ["0", "2"]
    assert all(isinstance(model[i], QATLoRALinear) and model[i].fake_quant == cfg for i in (0, 2))
    assert not model[0].active and not model[2].active
    set_qat_active(model, True)
    assert model[0].active and model[2].active
    enable_qat(model, None)
    assert type(model[0]) is LoRALinear and not hasattr(model[0], "active")


def test_enable_qat_rejects_layers_it_cannot_quantize():
    model = nn.Sequential(_lora()[0], _lora(out_f=128, in_f=48, nf4=False)[0])
    with pytest.raises(ValueError, match=r"^1: .*group_size 32.*K=48"):
        enable_qat(model, FakeQuantConfig("int", 4, 32))
    with_dropout = nn.Sequential(LoRALinear(nn.Linear(64, 64), r=2, alpha=4, dropout=0.1))
    with pytest.raises(ValueError, match="0: LoRA dropout"):
        enable_qat(with_dropout, FakeQuantConfig("nf4"))


def test_cached_qat_weights_match_and_follow_the_optimizer():
    lora, _ = _lora()
    enable_qat(lora, QAT_CONFIGS[1])
    x = torch.randn(2, 5, 128)
    opt = torch.optim.SGD(lora.parameters(), lr=0.1)
    with torch.no_grad():
        before = lora(x)
    with cached_qat_weights(lora):
        with torch.no_grad():
            assert torch.equal(lora(x), before)
            assert torch.equal(lora(x), before)  # served from the cache
        lora(x).square().sum().backward()  # with grad: the autograd path, not the cache
        opt.step()
        with torch.no_grad():
            after = lora(x)
    assert lora._cache is None
    with torch.no_grad():
        assert torch.equal(after, lora(x)) and not torch.equal(after, before)
