"""FP8 (e4m3) base GEMMs against float64: the operands, the GEMMs, the LoRA layer's gradients, the recipe key."""

from pathlib import Path

import pytest
import torch

from qlora_kit.config import RecipeError, load_recipe
from qlora_kit.modules.lora import NF4LoRALinear
from qlora_kit.modules.nf4_linear import NF4Linear, use_fp8_matmuls
from qlora_kit.quant import fp8
from qlora_kit.quant.nf4 import dequantize_nf4_reference, quantize_nf4

ROOT = Path(__file__).resolve().parent.parent
E4M3_REL = 2.0**-4  # e4m3's 3 mantissa bits: rounding moves a normal value by at most half of 2^-3 of itself


def _nf4(out_f=96, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_nf4(torch.randn(out_f, in_f, generator=g) / in_f**0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_rowwise_quantization_keeps_each_row_within_e4m3_rounding():
    x = torch.randn(7, 160, dtype=torch.float64) * torch.logspace(-3, 3, 7, dtype=torch.float64)[:, None]
    x[3] = 0
    q, s = fp8.quantize_rows(x.float())
    assert q.dtype == torch.float8_e4m3fn and s.shape == (7, 1)
    back = q.double() * s.double()
    rows = [r for r in range(7) if r != 3]
    # each row's largest value lands on 448, and every value within e4m3's rounding of itself
    # (or, in the subnormal range below 2^-6 * scale, within half a subnormal step)
    assert torch.equal(q[rows].float().abs().amax(1), torch.full((6,), 448.0))
    bound = torch.maximum(E4M3_REL * x.abs(), 2.0**-10 * s.double())
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert torch.equal(q[3].float(), torch.zeros(160))


def test_weight_codes_are_the_nf4_weight_over_its_scale():
    t = _nf4()
    scale = fp8.weight_scale(t)
    w64 = dequantize_nf4_reference(t, torch.float32).double()
    assert torch.isclose(scale.double(), w64.abs().max() / 448, rtol=1e-6)
    codes = fp8.dequantize_nf4_e4m3(t, scale)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == t.shape
    back = codes.double() * scale.double()
    bound = torch.maximum(E4M3_REL * w64.abs(), 2.0**-10 * scale.double())
    assert ((back - w64).abs() <= bound * (1 + 1e-5)).all()


@pytest.mark.parametrize("m", [1, 13, 64])
def test_gemms_equal_float64_products_of_the_e4m3_operands(m):
    t = _nf4()
    w_q, w_s = fp8.dequantize_nf4_e4m3(t, fp8.weight_scale(t)), fp8.weight_scale(t)
    w64 = w_q.double() * w_s.double()
    x = torch.randn(m, 128)
    xq, xs = fp8.quantize_rows_reference(x)
    y = fp8.linear(x, w_q, w_s)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), (xq.double() * xs.double()) @ w64.t(), rtol=1e-5, atol=1e-6)
    g = torch.randn(m, 96)
    gq, gs = fp8.quantize_rows_reference(g)
    dx = fp8.linear_grad_input(g, fp8.dequantize_nf4_e4m3(t, w_s, transposed=True), w_s)
    assert torch.allclose(dx.double(), (gq.double() * gs.double()) @ w64, rtol=1e-5, atol=1e-6)
    # and the products stay near the exact ones: e4m3's relative rounding, averaged over K
    exact = x.double() @ dequantize_nf4_reference(t, torch.float32).double().t()
    assert _rel(y, exact) < 0.05


def test_lora_layer_in_fp8_trains_like_the_full_precision_one():
    torch.manual_seed(0)
    ref = NF4LoRALinear(NF4Linear(_nf4(), compute_dtype=torch.float32), r=8, alpha=16)
    torch.nn.init.normal_(ref.lora_B.weight, std=0.05)
    ours = NF4LoRALinear(NF4Linear(_nf4(), compute_dtype=torch.float32), r=8, alpha=16)
    ours.load_state_dict(ref.state_dict())
    assert use_fp8_matmuls(ours) == 1 and "fp8 matmuls" in repr(ours)
    x = torch.randn(4, 9, 128)
    grads = []
    for layer in (ref, ours):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        # a loss of y itself, so that the adapters' gradients see the base through y
        y.pow(2).sum().backward()
        grads.append((y, xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad))
    for full, e4m3 in zip(*grads):
        assert 0 < _rel(e4m3, full) < 0.05  # perturbed (it is FP8), by e4m3's rounding only


def test_projections_of_one_activation_quantize_it_once_and_a_changed_one_again(monkeypatch):
    """q, k and v read one tensor: one row quantization for the three, each product as if quantized alone;
    an in-place write, a new tensor (even at a freed one's address) or an inference tensor: quantized anew."""
    calls = []
    quantize_rows = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda x: calls.append(x.shape) or quantize_rows(x))
    layers = [NF4Linear(_nf4(96, 128, seed), compute_dtype=torch.float32) for seed in range(3)]
    use_fp8_matmuls(torch.nn.ModuleList(layers))
    x = torch.randn(2, 5, 128)

    def alone(layer, x):
        xq, xs = fp8.quantize_rows_reference(x.reshape(-1, 128))
        w_q, w_s = layer.fp8_weight()
        return ((xq.double() * xs.double()) @ (w_q.double() * w_s.double().t()).t()).view(2, 5, 96)

    ys = [layer(x) for layer in layers]
    assert len(calls) == 1
    for layer, y in zip(layers, ys):
        assert torch.allclose(y.double(), alone(layer, x), rtol=1e-5, atol=1e-6)
    x.mul_(3)
    assert torch.allclose(layers[0](x).double(), alone(layers[0], x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 2
    x_value = x.clone()
    del x  # its entry goes with it
    assert fp8._last_activation is None
    layers[0](x_value)
    layers[0](x_value.view_as(x_value))  # a view is another tensor object
    assert len(calls) == 4
    with torch.inference_mode():
        xi = x_value.clone()
        layers[0](xi), layers[1](xi)
    assert len(calls) == 6


def test_backward_mode_keeps_the_forward_exact_and_runs_recompute_and_input_gradient_in_e4m3(monkeypatch):
    """fp8_base_matmul: backward. The forward equals the full-precision layer's bit for bit; the input
    gradient is the all-e4m3 layer's; a checkpointed layer's recompute (inside backward) runs in e4m3."""
    torch.manual_seed(0)
    layers = [NF4LoRALinear(NF4Linear(_nf4(), compute_dtype=torch.float32), r=8, alpha=16) for _ in range(3)]
    torch.nn.init.normal_(layers[0].lora_B.weight, std=0.05)
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    full, e4m3, backward_only = layers
    use_fp8_matmuls(e4m3)
    use_fp8_matmuls(backward_only, forward=False)
    x, g = torch.randn(4, 9, 128), torch.randn(4, 9, 96)
    outs = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(g)
        outs.append((y, xi.grad))
    assert torch.equal(outs[2][0], outs[0][0]) and not torch.equal(outs[1][0], outs[0][0])
    assert torch.equal(outs[2][1], outs[1][1]) and not torch.equal(outs[2][1], outs[0][1])

    calls = []
    quantize_rows = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda t: calls.append(t.shape) or quantize_rows(t))
    xi = x.clone().requires_grad_()
    y = torch.utils.checkpoint.checkpoint(backward_only, xi, use_reentrant=False)
    assert calls == [] and torch.equal(y, outs[0][0])
    y.backward(g)
    assert len(calls) == 2  # the recompute's x and the input gradient's dy
    assert torch.equal(xi.grad, outs[1][1])
    assert fp8._last_activation is None  # the recompute's copy of x does not outlive it into the backward


def test_shapes_that_are_not_multiples_of_16_keep_the_full_precision_gemm():
    model = torch.nn.Sequential(
        NF4Linear(_nf4(96, 128), compute_dtype=torch.float32), NF4Linear(_nf4(40, 96), compute_dtype=torch.float32)
    )
    assert use_fp8_matmuls(model) == 1
    assert model[0].fp8 and not model[1].fp8
    x = torch.randn(3, 128)
    assert torch.equal(model[1](x[:, :96]), x[:, :96] @ model[1].dequantized_weight().t())


def test_fp8_with_qat_is_refused_naming_both_keys():
    from qlora_kit.pipelines.builder import build_training_model

    recipe = load_recipe(ROOT / "recipes" / "bench.yaml", ["training.fp8_base_matmul=true", "qat.enabled=true"])
    with pytest.raises(RecipeError, match="training.fp8_base_matmul does not combine with qat"):
        build_training_model(recipe, "cpu", random_config=_tiny_config())


@pytest.mark.parametrize("value, forward", [("true", True), ("backward", False)])
def test_recipe_key_builds_every_base_layer_in_its_mode(value, forward):
    from qlora_kit.modules.nf4_linear import NF4Linear
    from qlora_kit.pipelines.builder import build_training_model

    recipe = load_recipe(ROOT / "recipes" / "bench.yaml", [f"training.fp8_base_matmul={value}"])
    built = build_training_model(recipe, "cpu", random_config=_tiny_config(), progress=False)
    layers = [m for m in built.model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 2 * 7 and all(m.fp8 and m.fp8_forward == forward for m in layers)


def test_recipe_key_refuses_other_values_naming_it():
    with pytest.raises(RecipeError, match=r"training.fp8_base_matmul.*true, false, or 'backward'"):
        load_recipe(ROOT / "recipes" / "bench.yaml", ["training.fp8_base_matmul=forward"])


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256
    )


@pytest.mark.slow
def test_quickstart_trains_in_fp8_and_its_curve_follows_the_full_precision_one(tmp_path, quickstart_losses):
    common = ("training.batch_size=2", "data.max_seq_len=96")
    full = quickstart_losses(tmp_path / "full", 30, *common)
    e4m3 = quickstart_losses(tmp_path / "fp8", 30, *common, "training.fp8_base_matmul=true")
    assert len(full) == len(e4m3) == 30
    # Step 0 is the base alone (B = 0): e4m3's rounding of x and W moves SmolLM2's loss (0.90 -> 1.03
    # measured), and no more than that.
    assert e4m3[0] != full[0] and abs(e4m3[0] - full[0]) < 0.2 * full[0]
    # It learns the task as the full-precision run does: the last ten steps near zero, the whole
    # curve's mean within a quarter of the full-precision one's.
    assert sum(e4m3[-10:]) / 10 < 0.1 * e4m3[0]
    assert abs(sum(e4m3) - sum(full)) < 0.25 * sum(full)
