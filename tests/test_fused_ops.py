"""The fused ops (qlora_kit.modules.fused_ops) against the transformers ops they replace, forward and backward.

The Triton path is forced (``kernel="triton"``); without CUDA it runs under the Triton
interpreter on the CPU (TRITON_INTERPRET must be set before the kernel modules are imported),
so sizes stay small. fp32 results must match the transformers op within 1e-5 relative; bf16
results must be no farther from the float64 result than twice the transformers op's own error
(the kernels round once where the stock ops round after every op, except RMSNorm, which keeps
transformers' rounding before the weight multiply).
"""

import os

import pytest
import torch
from torch.func import functional_call

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot run here")

from transformers import LlamaConfig  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb  # noqa: E402

from qlora_kit.kernels.rmsnorm import rms_norm_forward  # noqa: E402
from qlora_kit.kernels.rope import rope_forward  # noqa: E402
from qlora_kit.kernels.swiglu import swiglu_forward  # noqa: E402
from qlora_kit.modules.fused_ops import apply_rotary, rms_norm, swiglu  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6
# use_fused_ops may have replaced the module global by its dispatcher: take the stock function.
hf_apply_rotary_pos_emb = getattr(hf_apply_rotary_pos_emb, "original", hf_apply_rotary_pos_emb)


def hf_rms_norm(x, weight):
    """transformers' LlamaRMSNorm module, with ``weight`` as its parameter (gradients reach ``weight``)."""
    module = LlamaRMSNorm(x.shape[-1], eps=EPS).to(x.device)
    return functional_call(module, {"weight": weight}, (x,))


def hf_swiglu(g, u):
    """LlamaMLP's ``act_fn(gate_proj(x)) * up_proj(x)``."""
    return ACT2FN["silu"](g) * u


def _randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def _run(fn, inputs, grads_out, needs_grad):
    """``fn``'s outputs and the gradients of its inputs that ``needs_grad`` marks, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(rg) for t, rg in zip(inputs, needs_grad)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads_out)])
    return [o.detach() for o in outs], [t.grad for t, rg in zip(leaves, needs_grad) if rg]


def _compare(ours, stock, exact, what):
    """fp32: within 1e-5 of the transformers op (relative to the largest value); bf16: within 2x its error."""
    assert ours.dtype == stock.dtype and ours.shape == stock.shape, what
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5 * stock.abs().max().item(), msg=what)
    else:
        err = (ours.double() - exact).abs().max().item()
        stock_err = (stock.double() - exact).abs().max().item()
        assert 0 < stock_err and err <= 2 * stock_err, f"{what}: error {err:.3g}, transformers' {stock_err:.3g}"


def _check_op(ours_fn, hf_fn, inputs, needs_grad, seed):
    """Forward and backward of ours_fn (Triton forced) against hf_fn, and hf_fn in float64."""
    with torch.no_grad():
        outs = hf_fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads_out = [_randn(o.shape, torch.float32, seed + i) for i, o in enumerate(outs)]
    ours = _run(ours_fn, inputs, grads_out, needs_grad)
    stock = _run(hf_fn, inputs, grads_out, needs_grad)
    exact = _run(hf_fn, [t.double() for t in inputs], [g.double() for g in grads_out], needs_grad)
    for part, kind in ((0, "output"), (1, "grad")):
        for i, (o, s, e) in enumerate(zip(ours[part], stock[part], exact[part])):
            _compare(o, s, e, f"{kind} {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_trainable", [False, True])
def test_rms_norm_matches_llama_rms_norm(dtype, weight_trainable):
    # 38 rows of 576 (SmolLM2's hidden: not a power of two); the weight-gradient path splits
    # the rows unevenly over its programs.
    x = _randn((2, 19, 576), dtype, seed=1, scale=3.0)
    w = (torch.rand(576, generator=torch.Generator().manual_seed(2)) + 0.5).to(dtype).to(DEVICE)
    ours = lambda x, w: rms_norm(x, w, EPS, kernel="triton")  # noqa: E731
    _check_op(ours, hf_rms_norm, [x, w], [True, weight_trainable], seed=3)


def test_rms_norm_frozen_weight_gets_no_gradient():
    x = _randn((5, 64), torch.bfloat16, seed=4).requires_grad_()
    w = torch.ones(64, dtype=torch.bfloat16, device=DEVICE)
    rms_norm(x, w, EPS, kernel="triton").sum().backward()
    assert x.grad is not None and w.grad is None


def test_rms_norm_forward_rounds_like_transformers():
    """bf16 and fp16 inputs with a bf16 or fp32 weight: output dtype and bits as LlamaRMSNorm's."""
    for x_dtype, w_dtype in [
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ]:
        x = _randn((7, 576), x_dtype, seed=5, scale=2.0)
        w = _randn((576,), w_dtype, seed=6)
        y, rstd = rms_norm_forward(x, w, EPS)
        expected = hf_rms_norm(x, w)
        assert y.dtype == expected.dtype and rstd.shape == (7,)
        # Only the fp32 mean square can differ (summation order): rarely, one rounding step of the output.
        assert (y == expected).float().mean() > 0.99, (x_dtype, w_dtype)
        torch.testing.assert_close(y, expected, rtol=2**-7, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_silu_mul(dtype):
    # 3 * 37 * 100 elements: not a multiple of the block. Scale 4 reaches silu's saturated tails.
    g = _randn((3, 37, 100), dtype, seed=7, scale=4.0)
    u = _randn((3, 37, 100), dtype, seed=8)
    _check_op(lambda g, u: swiglu(g, u, kernel="triton"), hf_swiglu, [g, u], [True, True], seed=9)


def test_swiglu_mixed_dtypes():
    g, u = _randn((5, 33), torch.bfloat16, seed=10), _randn((5, 33), torch.float32, seed=11)
    h = swiglu_forward(g, u)
    expected = hf_swiglu(g.double(), u.double())
    assert h.dtype == hf_swiglu(g, u).dtype == torch.float32
    torch.testing.assert_close(h.double(), expected, rtol=1e-6, atol=1e-6)


def _rotary_inputs(dtype, head_dim, cos_sin="positions", cos_dtype=None, seed=0):
    """q, k as transformers' attention makes them (transposed views of [batch, seq, heads, head_dim]), and
    cos, sin. ``cos_sin``: "positions" (LlamaRotaryEmbedding at positions 0.., [1, seq, head_dim]),
    "batch_positions" (random positions per batch row, [batch, seq, head_dim]) or "random" (unrelated
    values, halves differing, which the kernel's general rotation must handle too)."""
    batch, seq, q_heads, kv_heads = 2, 37, 4, 2
    q = _randn((batch, seq, q_heads, head_dim), dtype, seed=seed).transpose(1, 2)
    k = _randn((batch, seq, kv_heads, head_dim), dtype, seed=seed + 1).transpose(1, 2)
    cos_dtype = cos_dtype or dtype
    if cos_sin == "random":
        shape = (batch, seq, head_dim)
        return q, k, _randn(shape, cos_dtype, seed + 2), _randn(shape, cos_dtype, seed + 3)
    config = LlamaConfig(hidden_size=q_heads * head_dim, num_attention_heads=q_heads, head_dim=head_dim)
    rotary = LlamaRotaryEmbedding(config).to(DEVICE)
    if cos_sin == "batch_positions":
        positions = torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
    else:
        positions = torch.arange(seq, device=DEVICE)[None]
    return q, k, *rotary(torch.empty(0, dtype=cos_dtype, device=DEVICE), positions)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_sin", ["positions", "batch_positions", "random"])
def test_rotary_matches_apply_rotary_pos_emb(dtype, cos_sin):
    q, k, cos, sin = _rotary_inputs(dtype, 64, cos_sin, seed=12)
    ours = lambda q, k, cos, sin: apply_rotary(q, k, cos, sin, kernel="triton")  # noqa: E731
    _check_op(ours, hf_apply_rotary_pos_emb, [q, k, cos, sin], [True, True, False, False], seed=13)


def test_rotary_odd_head_dim():
    """head_dim 96: halves of 48, not a power of two."""
    q, k, cos, sin = _rotary_inputs(torch.float32, 96, seed=14)
    ours = lambda q, k, cos, sin: apply_rotary(q, k, cos, sin, kernel="triton")  # noqa: E731
    _check_op(ours, hf_apply_rotary_pos_emb, [q, k, cos, sin], [True, True, False, False], seed=15)


def test_rotary_dtypes_and_layout_as_transformers():
    """bf16 q/k with fp32 cos/sin give fp32, as in transformers; the output keeps q's memory layout."""
    q, k, cos, sin = _rotary_inputs(torch.bfloat16, 64, cos_dtype=torch.float32, seed=16)
    expected = hf_apply_rotary_pos_emb(q, k, cos, sin)
    ours = apply_rotary(q, k, cos, sin, kernel="triton")
    for o, e in zip(ours, expected):
        assert o.dtype == e.dtype == torch.float32 and o.stride() == e.stride()
        torch.testing.assert_close(o, e, rtol=1e-6, atol=1e-6)


def test_torch_path_is_the_transformers_op():
    """kernel="torch" (what runs off CUDA) computes exactly what transformers computes."""
    x, w = _randn((3, 576), torch.bfloat16, seed=17), _randn((576,), torch.bfloat16, seed=18)
    assert torch.equal(rms_norm(x, w, EPS, kernel="torch"), hf_rms_norm(x, w))
    g, u = _randn((3, 50), torch.bfloat16, seed=19), _randn((3, 50), torch.bfloat16, seed=20)
    assert torch.equal(swiglu(g, u, kernel="torch"), hf_swiglu(g, u))
    q, k, cos, sin = _rotary_inputs(torch.bfloat16, 64, seed=21)
    for o, e in zip(apply_rotary(q, k, cos, sin, kernel="torch"), hf_apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(o, e)


def test_auto_uses_the_kernels_on_cuda_only():
    x = _randn((3, 64), torch.float32, seed=22).requires_grad_()
    w = torch.ones(64, device=DEVICE)
    fused = DEVICE.type == "cuda"
    assert (rms_norm(x, w, EPS).grad_fn.name() == "_RMSNormBackward") == fused
    assert (swiglu(x, x).grad_fn.name() == "_SwiGLUBackward") == fused
    with pytest.raises(ValueError, match="kernel"):
        rms_norm(x, w, EPS, kernel="cuda")


def _saved_shapes(fn, *inputs):
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    return sorted(saved)


def test_backward_saves_only_the_inputs_it_needs():
    x = _randn((4, 64), torch.bfloat16, seed=23)
    w = torch.ones(64, dtype=torch.bfloat16, device=DEVICE)
    assert _saved_shapes(lambda x, w: rms_norm(x, w, EPS, kernel="triton"), x, w) == [(4,), (4, 64), (64,)]
    assert _saved_shapes(lambda g, u: swiglu(g, u, kernel="triton"), x, x) == [(4, 64), (4, 64)]
    q, k, cos, sin = _rotary_inputs(torch.bfloat16, 64, seed=24)
    rotary = lambda q, k: apply_rotary(q, k, cos, sin, kernel="triton")  # noqa: E731
    assert _saved_shapes(rotary, q, k) == [tuple(cos.shape)] * 2


def test_kernels_reject_bad_arguments():
    x = _randn((4, 64), torch.float32, seed=25)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_forward(x, torch.ones(63, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="last dim"):
        rms_norm_forward(torch.zeros(2, 32768, device=DEVICE), torch.ones(32768, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="shape"):
        swiglu_forward(x, x[:, :32])
    cos = torch.ones(1, 5, 6, device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        rope_forward(torch.zeros(1, 2, 5, 7, device=DEVICE), cos, cos)
    with pytest.raises(ValueError, match="cos"):
        rope_forward(torch.zeros(1, 2, 5, 6, device=DEVICE), cos[:, :4], cos)
