"""GPTQ against RTN, against a float64 sequential OBS reference, and its Hessian."""

import pytest
import torch

from qlora_kit.quant.gptq import GPTQ
from qlora_kit.quant.intq import rtn_quantize


def hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def correlated_inputs(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=g)
    # Unequal channel magnitudes give act-order a distinct order to find.
    return torch.randn(n, k, generator=g) @ mix * torch.linspace(0.5, 2.0, k)


def output_error(x, weight, deq):
    return (x @ weight.T - x @ deq.T).norm().item()


def gptq(x, weight, **kwargs):
    layer = GPTQ(weight.shape[1])
    layer.add_batch(x)
    return layer.quantize(weight, **kwargs), layer


def obs_reference(weight, x, bits, group_size, symmetric, act_order, damp=0.01):
    """Sequential OBS in float64: quantize column i, update the rest with H^-1's row,
    then remove i from H^-1 (Gaussian elimination). No Cholesky, no lazy batches."""
    W = weight.double().clone()
    x = x.double()
    k = W.shape[1]
    maxq = 2**bits - 1
    H = 2 / x.shape[0] * x.T @ x
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.linalg.inv(H + damp * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype))
    g = k if group_size == -1 else group_size
    Q = torch.zeros_like(W)
    loss = 0.0
    for i in range(k):
        if i % g == 0:
            grp = W[:, i : i + g]
            if symmetric:
                scale, zero = 2 * grp.abs().amax(1) / maxq, torch.full((W.shape[0],), 2.0 ** (bits - 1))
            else:
                scale = (grp.amax(1) - grp.amin(1)).clamp(min=1e-5) / maxq
                zero = (-torch.round(grp.amin(1) / scale)).clamp(0, maxq)
        Q[:, i] = torch.clamp(torch.round(W[:, i] / scale) + zero, 0, maxq)
        diff = W[:, i] - scale * (Q[:, i] - zero)
        loss += (diff**2 / Hinv[i, i]).sum().item() / 2
        W[:, i + 1 :] -= (diff / Hinv[i, i])[:, None] * Hinv[i, i + 1 :][None]
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]
    return Q[:, torch.argsort(perm)], loss


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_uncorrelated_inputs_give_exactly_rtn(symmetric, group_size):
    # Orthogonal input columns: H is diagonal, so no error is propagated.
    torch.manual_seed(3)
    x = hadamard(128)
    weight = torch.randn(16, 128)
    w, layer = gptq(x, weight, group_size=group_size, symmetric=symmetric)
    assert torch.count_nonzero(layer.H - torch.diag(torch.diag(layer.H))) == 0
    rtn = rtn_quantize(weight, group_size=group_size, symmetric=symmetric)
    assert torch.equal(w.q, rtn.q)
    assert torch.equal(w.scale, rtn.scale)
    assert torch.equal(w.zero, rtn.zero)
    assert torch.equal(w.g_idx, rtn.g_idx)


@pytest.mark.parametrize(
    "symmetric,act_order,group_size",
    [(True, False, 32), (True, False, -1), (False, False, 32), (True, True, 32), (False, True, 64)],
)
def test_gptq_beats_rtn_on_correlated_inputs(symmetric, act_order, group_size):
    torch.manual_seed(0)
    x = correlated_inputs(512, 128, seed=0)
    weight = torch.randn(32, 128)
    w, _ = gptq(x, weight, group_size=group_size, symmetric=symmetric, act_order=act_order)
    rtn = rtn_quantize(weight, group_size=group_size, symmetric=symmetric)
    # Measured ratio about 0.8 (0.55 with act-order) over several seeds.
    assert output_error(x, weight, w.dequantize()) < 0.88 * output_error(x, weight, rtn.dequantize())

    assert w.q.dtype == torch.uint8 and int(w.q.max()) <= 15
    g = 128 if group_size == -1 else group_size
    assert w.scale.shape == (32, 128 // g) and w.zero.shape == (32, 128 // g)
    # dequantize() is the grid formula with each column's own group.
    gi = w.g_idx.long()
    expected = w.scale[:, gi] * (w.q.float() - w.zero[:, gi].float())
    torch.testing.assert_close(w.dequantize(), expected, rtol=0, atol=0)
    # Every group holds exactly group_size columns.
    assert torch.equal(torch.bincount(gi), torch.full((128 // g,), g))


def test_act_order_groups_follow_descending_hessian_diagonal():
    torch.manual_seed(1)
    x = correlated_inputs(512, 128, seed=1)
    weight = torch.randn(16, 128)
    w, layer = gptq(x, weight, group_size=32, act_order=True)
    # Quantizing the large-magnitude channels first leaves the error to the small ones.
    plain, _ = gptq(x, weight, group_size=32)
    assert output_error(x, weight, w.dequantize()) < 0.9 * output_error(x, weight, plain.dequantize())
    rank = torch.empty(128, dtype=torch.long)
    rank[torch.argsort(torch.diag(layer.H), descending=True)] = torch.arange(128)
    assert torch.equal(w.g_idx.long(), rank // 32)
    assert not torch.equal(w.g_idx.long(), torch.arange(128) // 32)


@pytest.mark.parametrize(
    "symmetric,act_order,group_size,blocksize",
    [
        (False, False, 32, 128),
        (False, False, 32, 24),  # blocks not aligned to groups
        (False, True, 32, 16),
        (False, False, 64, 40),
        (True, False, -1, 48),
        (True, False, 32, 128),
    ],
)
def test_matches_float64_obs_reference(symmetric, act_order, group_size, blocksize):
    torch.manual_seed(2)
    x = correlated_inputs(512, 128, seed=2)
    weight = torch.randn(32, 128)
    w, layer = gptq(x, weight, group_size=group_size, symmetric=symmetric, act_order=act_order, blocksize=blocksize)
    q_ref, loss_ref = obs_reference(weight, x, 4, group_size, symmetric, act_order)
    # fp32 and fp64 part at exact rounding ties (the symmetric grid puts -max|w|
    # on one), after which that row's later columns drift; all else agrees.
    agree = (w.q.double() == q_ref).float().mean().item()
    assert agree > (0.999 if not symmetric else 0.95)
    assert layer.loss == pytest.approx(loss_ref, rel=0.03 if symmetric else 1e-3)


def test_dead_columns_are_zeroed_and_stay_finite():
    torch.manual_seed(4)
    x = correlated_inputs(256, 64, seed=3)
    dead = [5, 40]
    x[:, dead] = 0
    weight = torch.randn(16, 64)
    w, layer = gptq(x, weight, group_size=32)
    assert (torch.diag(layer.H)[dead] == 0).all()
    deq = w.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(w.scale).all()
    assert (deq[:, dead] == 0).all()
    rtn = rtn_quantize(weight, group_size=32)
    assert output_error(x, weight, deq) < output_error(x, weight, rtn.dequantize())


def test_hessian_is_running_average_of_2_xxt_in_float64():
    torch.manual_seed(5)
    batches = [torch.randn(2, 5, 24), torch.randn(7, 24), torch.randn(1, 3, 24, dtype=torch.float64)]
    layer = GPTQ(24)
    for b in batches:
        layer.add_batch(b)
    x = torch.cat([b.reshape(-1, 24).double() for b in batches])
    expected = 2 / x.shape[0] * x.T @ x
    assert layer.nsamples == 20
    assert layer.H.dtype == torch.float32
    torch.testing.assert_close(layer.H.double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    layer = GPTQ(64)
    with pytest.raises(ValueError, match="before any add_batch"):
        layer.quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"\(3, 32\)"):
        layer.add_batch(torch.randn(3, 32))
    layer.add_batch(torch.randn(16, 64))
    with pytest.raises(ValueError, match=r"\(8, 48\)"):
        layer.quantize(torch.randn(8, 48))
    with pytest.raises(ValueError, match="K=64"):
        layer.quantize(torch.randn(8, 64), group_size=48)
