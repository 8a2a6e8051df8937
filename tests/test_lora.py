"""The LoRA layer classes, each against what it says it computes.

LoRALinear and NF4LoRALinear against y = x W^T + b + scale * (x A^T) B^T in float64, with
its gradients by float64 autograd; add_lora's choice between them; QATLoRALinear made in
place from either, keeping the module, its adapter Parameters and, while inactive, its forward.
"""

import pytest
import torch
from torch import nn

from qlora_kit.model.adapters import add_lora, lora_modules
from qlora_kit.modules.fake_quant import FakeQuantConfig
from qlora_kit.modules.lora import LoRALinear, NF4LoRALinear
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.modules.qat_lora import QATLoRALinear, QATNF4LoRALinear, enable_qat, set_qat_active
from qlora_kit.quant.nf4 import dequantize_nf4_reference, quantize_nf4


def _nf4_base(out_f=96, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    return NF4Linear(quantize_nf4(w), torch.randn(out_f, generator=g), compute_dtype=torch.float32)


def _linear_base(out_f=96, in_f=128):
    return nn.Linear(in_f, out_f).requires_grad_(False)


def _base_weight64(base):
    if isinstance(base, NF4Linear):
        return dequantize_nf4_reference(base.nf4_weight).double()
    return base.weight.double()


# name: (layer, the scale the LoRA paper / rsLoRA gives for r=4, alpha=8)
LAYERS = {
    "plain-linear": (lambda: LoRALinear(_linear_base(), r=4, alpha=8), 2.0),
    "plain-nf4": (lambda: LoRALinear(_nf4_base(), r=4, alpha=8), 2.0),
    "plain-rslora": (lambda: LoRALinear(_nf4_base(), r=4, alpha=8, use_rslora=True), 4.0),
    "fused-nf4": (lambda: NF4LoRALinear(_nf4_base(), r=4, alpha=8), 2.0),
    "fused-rslora": (lambda: NF4LoRALinear(_nf4_base(), r=4, alpha=8, use_rslora=True), 4.0),
}


@pytest.mark.parametrize("make, scale", LAYERS.values(), ids=LAYERS.keys())
def test_layer_matches_float64_lora(make, scale):
    torch.manual_seed(0)
    lora = make()
    nn.init.normal_(lora.lora_B.weight, std=0.1)  # B starts at zero: give the adapter a value
    x = torch.randn(3, 5, 128, requires_grad=True)
    g = torch.randn(3, 5, 96)
    y = lora(x)
    y.backward(g)

    x64 = x.detach().double().requires_grad_()
    a64 = lora.lora_A.weight.detach().double().requires_grad_()
    b64 = lora.lora_B.weight.detach().double().requires_grad_()
    y64 = x64 @ _base_weight64(lora.base).t() + lora.base.bias.double() + scale * (x64 @ a64.t()) @ b64.t()
    y64.backward(g.double())
    got = (y, x.grad, lora.lora_A.weight.grad, lora.lora_B.weight.grad)
    for ours, ref in zip(got, (y64, x64.grad, a64.grad, b64.grad)):
        assert (ours.double() - ref).norm() <= 1e-5 * ref.norm()


def test_plain_layer_drops_out_the_adapter_input_only():
    torch.manual_seed(0)
    lora = LoRALinear(_nf4_base(), r=4, alpha=8, dropout=0.5)
    nn.init.normal_(lora.lora_B.weight, std=0.1)
    x = torch.randn(3, 5, 128)
    a, b = lora.lora_A.weight.detach().double(), lora.lora_B.weight.detach().double()
    base = x.double() @ _base_weight64(lora.base).t() + lora.base.bias.double()
    torch.manual_seed(7)
    y = lora(x)
    torch.manual_seed(7)
    kept = nn.functional.dropout(torch.ones_like(x), 0.5).double()  # the same draws: 0 or 1 / (1 - p)
    assert set(kept.unique().tolist()) == {0.0, 2.0}
    y64 = base + 2.0 * ((x.double() * kept) @ a.t()) @ b.t()
    assert (y.double() - y64).norm() <= 1e-5 * y64.norm()
    lora.eval()
    y64 = base + 2.0 * (x.double() @ a.t()) @ b.t()
    assert (lora(x).double() - y64).norm() <= 1e-5 * y64.norm()


def test_fused_layer_needs_an_nf4_base():
    with pytest.raises(TypeError, match="NF4LoRALinear needs an NF4Linear base, got Linear"):
        NF4LoRALinear(_linear_base(), r=4, alpha=8)


def _model():
    """Two decoder layers, one NF4 and one plain linear each (add_lora looks under ``.layers.``)."""
    model = nn.Module()
    model.layers = nn.ModuleList(
        nn.ModuleDict({"q_proj": _nf4_base(seed=i), "o_proj": _linear_base(128, 96)}) for i in range(2)
    )
    return model


@pytest.mark.parametrize(
    "fused, dropout, nf4_class",
    [(True, 0.0, NF4LoRALinear), (True, 0.1, LoRALinear), (False, 0.0, LoRALinear)],
    ids=["fused", "fused-with-dropout", "plain"],
)
def test_add_lora_chooses_the_class_and_initialises_alike(fused, dropout, nf4_class):
    torch.manual_seed(0)
    reference = _model()
    add_lora(reference, 4, 8, fused=False)
    torch.manual_seed(0)
    model = _model()
    assert add_lora(model, 4, 8, dropout, fused=fused) == list(lora_modules(reference))
    for name, m in lora_modules(model).items():
        assert type(m) is (nf4_class if name.endswith("q_proj") else LoRALinear)
        assert torch.equal(m.lora_A.weight, lora_modules(reference)[name].lora_A.weight)  # one seed, one init
    assert model.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize(
    "make, qat_class", [(LAYERS["plain-nf4"][0], QATLoRALinear), (LAYERS["fused-nf4"][0], QATNF4LoRALinear)]
)
def test_enable_qat_keeps_the_module_and_its_parameters(make, qat_class):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    nn.init.normal_(model[0].lora_B.weight, std=0.1)
    lora, lora_class = model[0], type(model[0])
    params, state = dict(model.named_parameters()), model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 5, 128, requires_grad=True)

    def run():
        x.grad = lora.lora_A.weight.grad = lora.lora_B.weight.grad = None
        y = model(x)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad, lora.lora_A.weight.grad, lora.lora_B.weight.grad

    before = run()
    enable_qat(model, FakeQuantConfig("int", 4, 32), active=False)
    assert model[0] is lora and type(lora) is qat_class
    assert all(p is params[n] for n, p in model.named_parameters()) and model.state_dict().keys() == state.keys()
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], params.values(), strict=True))
    for ours, ref in zip(run(), before):  # inactive: the forward of the layer it was made from, bit for bit
        assert torch.equal(ours, ref)
    set_qat_active(model, True)
    assert not torch.equal(run()[0], before[0])
    enable_qat(model, None)
    assert model[0] is lora and type(lora) is lora_class
    for ours, ref in zip(run(), before):
        assert torch.equal(ours, ref)


def test_enable_qat_refuses_a_lora_class_it_does_not_know():
    class ScaledLoRA(LoRALinear):
        pass

    with pytest.raises(TypeError, match="0: no QAT version of ScaledLoRA"):
        enable_qat(nn.Sequential(ScaledLoRA(_linear_base(), r=4, alpha=8)), FakeQuantConfig("int", 4, 32))
