"""On a CUDA GPU: our NF4 kernels against bitsandbytes' CUDA kernels, bit for bit (skipped elsewhere)."""

from pathlib import Path

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


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (576, 1536), (4097, 333)])
def test_fp8_weight_kernel_equals_torch_reference_bit_for_bit(shape):
    from qlora_kit.quant import fp8
    from qlora_kit.quant.nf4 import quantize_nf4

    t = quantize_nf4(torch.randn(shape, device="cuda") / shape[-1] ** 0.5)
    scale = fp8.weight_scale(t)
    ours, ref = fp8.dequantize_nf4_e4m3(t, scale), fp8.dequantize_nf4_e4m3_reference(t, scale)
    assert ours.dtype == ref.dtype == torch.float8_e4m3fn
    assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8))
    ours_t = fp8.dequantize_nf4_e4m3(t, scale, transposed=True)
    assert ours_t.is_contiguous() and torch.equal(ours_t.view(torch.uint8), ref.t().view(torch.uint8))


@pytest.mark.parametrize("shape", [(8192, 4096), (13, 14336), (5, 576), (7, 20000)])
def test_fp8_row_quantizer_kernel_equals_torch_reference_bit_for_bit(shape):
    from qlora_kit.quant import fp8

    x = (torch.randn(shape, device="cuda") * torch.rand(shape[0], 1, device="cuda") * 10).to(torch.bfloat16)
    x[1] = 0
    (q, s), (q_ref, s_ref) = fp8.quantize_rows(x), fp8.quantize_rows_reference(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_fp8_lora_layer_on_gpu_matches_float64_of_its_operands():
    from qlora_kit.modules.lora import NF4LoRALinear
    from qlora_kit.modules.nf4_linear import NF4Linear, use_fp8_matmuls
    from qlora_kit.quant import fp8
    from qlora_kit.quant.nf4 import quantize_nf4

    layer = NF4LoRALinear(NF4Linear(quantize_nf4(torch.randn(1024, 2048, device="cuda") / 45)), r=16, alpha=32)
    assert use_fp8_matmuls(layer) == 1
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)  # B = 0: the base alone
    w_q, w_s = layer.base.fp8_weight()  # w_s: s_W repeated over the output columns, [1, 1024]
    assert torch.equal(layer.base.fp8_weight(transposed=True)[0].view(torch.uint8), w_q.t().view(torch.uint8))
    xq, xs = fp8.quantize_rows_reference(x.detach())
    ref = (xq.double() * xs.double()) @ (w_q.double() * w_s.double().t()).t()
    assert (y.double() - ref).norm() / ref.norm() < 4e-3  # bf16 output rounding
    g = torch.randn_like(y)
    y.backward(g)
    gq, gs = fp8.quantize_rows_reference(g)
    grad_ref = (gq.double() * gs.double()) @ (w_q.double() * w_s.double().t())
    assert (x.grad.double() - grad_ref).norm() / grad_ref.norm() < 4e-3


def _two_steps(config, ids, overrides: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """recipes/bench.yaml + overrides on a random model of ``config``: two steps (the second reuses the
    pinned buffers and the copy streams); the last loss and the LoRA gradients."""
    from qlora_kit.config import load_recipe
    from qlora_kit.pipelines.builder import build_training_model

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "bench.yaml", overrides)
    model = build_training_model(recipe, "cuda", random_config=config, progress=False).model.train()
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids)["loss"]
        loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def _equal_runs(layers: int, overrides_a: list[str], overrides_b: list[str], between=lambda: None) -> None:
    """Two builds of a small random Llama (``layers`` layers) train two steps each on the same tokens
    (``between`` runs in between): the same loss and LoRA gradients, bit for bit."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4, vocab_size=512
    )
    ids = torch.randint(0, 512, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    loss_a, grads_a = _two_steps(config, ids, overrides_a)
    between()
    loss_b, grads_b = _two_steps(config, ids, overrides_b)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == layers * 7 * 2
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_offloaded_checkpoints_on_copy_streams_give_the_same_gradients():
    """Checkpoint inputs go to CPU memory and come back on their own streams: same loss and LoRA gradients."""
    fused = "training.fused_kernels=true"
    _equal_runs(6, ["training.offload_activations=false", fused], ["training.offload_activations=true", fused])


@pytest.mark.parametrize("attention", ["true", "false"])
def test_kept_projections_on_copy_streams_give_the_same_gradients(attention):
    """recompute_projections=false: q, k, v and o outputs come back from CPU memory on the copy stream instead of
    being computed again, with attention recomputed or kept: the loss and LoRA gradients bit for bit."""
    overrides = ["training.offload_activations=true", f"training.recompute_attention={attention}"]
    _equal_runs(6, overrides, [*overrides, "training.recompute_projections=false"])


@pytest.mark.parametrize("chunk", [0, 128])
@pytest.mark.parametrize("offload", ["false", "true"])
def test_recompute_without_down_proj_gives_the_same_gradients(monkeypatch, offload, chunk):
    """The recompute leaves each checkpointed layer's down_proj GEMM out, a tiled MLP (chunks of 128 of 512
    tokens) its whole forward (model/recompute.py): on CUDA, bf16 autocast, the loss and LoRA gradients of
    the same build whose recompute computes them."""
    from qlora_kit.pipelines import builder

    overrides = [f"training.offload_activations={offload}", "training.fused_kernels=true"]
    overrides.append(f"training.mlp_chunk_tokens={chunk}")
    _equal_runs(4, overrides, overrides, lambda: monkeypatch.setattr(builder, "skip_unread_outputs", lambda lm: 0))


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "sdpa's choice"])
def test_kept_attention_gives_the_recomputed_gradients(monkeypatch, backend):
    """recompute_attention=false on CUDA, sdpa held to the flash kernel or left to its own choice (cuDNN on
    Hopper, which the kept path then runs too): the loss and LoRA gradients of the recomputing run."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import LlamaConfig

    from qlora_kit.model import offload

    kept_calls = []
    flash = offload.flash_forward
    monkeypatch.setattr(offload, "flash_forward", lambda *a: kept_calls.append(1) or flash(*a))
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=512,
    )
    ids = torch.randint(0, 512, (2, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    offloaded = ["training.offload_activations=true"]
    held = sdpa_kernel(getattr(SDPBackend, backend)) if backend != "sdpa's choice" else contextlib.nullcontext()
    with held:
        loss_a, grads_a = _two_steps(config, ids, [*offloaded, "training.recompute_attention=true"])
        loss_b, grads_b = _two_steps(config, ids, [*offloaded, "training.recompute_attention=false"])
    assert len(kept_calls) == 2 * 4  # the kept run's two forwards, 4 layers each
    # The same kernel in the forward; sdpa may call cuDNN's without the logsumexp, another kernel plan.
    assert torch.allclose(loss_a, loss_b, rtol=1e-3, atol=0), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 4 * 7 * 2
    for name in grads_a:
        # The same backward of the same O and L: equal up to its atomic adds' order.
        err = (grads_a[name] - grads_b[name]).norm() / grads_a[name].norm().clamp_min(1e-30)
        assert err < 1e-2, (name, err.item())


def test_linear_nll_sum_under_bf16_autocast_matches_float64():
    """The SFT loss's gradient-in-forward lm_head on the GPU, bf16 autocast (the training setting), against
    float64 autograd of the same bf16 operands: as close as the checkpointed cross_entropy path is."""
    from torch.nn import functional as F

    from qlora_kit.modules.linear_cross_entropy import linear_nll_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(512, 32000, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 32000, (3000,), device="cuda")

    def grads(loss_fn):
        hidden.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        return loss.double(), hidden.grad.double()

    ours = grads(lambda: linear_nll_sum(hidden, head, targets, 1024))
    stock = grads(lambda: F.cross_entropy(head(hidden).float(), targets, reduction="sum"))
    h64 = hidden.detach().double().requires_grad_(True)
    exact = F.cross_entropy(h64 @ head.weight.double().t(), targets, reduction="sum")
    exact.backward()
    for name, (loss, _) in (("ours", ours), ("stock", stock)):
        assert abs(loss.item() - exact.item()) / exact.item() < 1e-3, name
    error = {
        name: ((grad - h64.grad).norm() / h64.grad.norm()).item()
        for name, (_, grad) in (("ours", ours), ("stock", stock))
    }
    assert error["ours"] <= 1.5 * error["stock"] + 1e-4, error


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_step_without_syncs_equals_its_own_step(name):
    """The Trainer's and the benchmark's bitsandbytes optimizer (no synchronization after each tensor)
    against bitsandbytes' own class: the same weights and states after three steps, bit for bit."""
    import bitsandbytes as bnb

    from qlora_kit.pipelines.optim import optimizer_class

    own = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    ours = optimizer_class(name)
    assert issubclass(ours, own) and ours is not own
    g = torch.Generator("cuda").manual_seed(0)
    shapes = [(16, 4096), (4096, 16), (5000,), (64, 64)]  # 8-bit states start at 4,096 elements
    start = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=g) for s in shapes] for _ in range(3)]
    results = []
    for cls in (own, ours):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = cls(params, lr=1e-2, weight_decay=0.1)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            optimizer.step()
        torch.cuda.synchronize()
        results.append((params, [optimizer.state[p] for p in params]))
    (own_params, own_states), (our_params, our_states) = results
    for a, b, sa, sb in zip(own_params, our_params, own_states, our_states):
        assert torch.equal(a, b)
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb[key]), key


def test_training_steps_never_wait_for_the_gpu(tmp_path, word_model_dir, task_files, make_recipe, monkeypatch):
    """train() on the GPU with every host-device synchronization an error from the end of step 2 to the end of
    step 4: fetching the batch, forward, backward, clipping, the optimizer and the scheduler queue work without
    waiting for it (logging, saving and evaluation, which read results, are outside that window)."""
    from transformers import TrainerCallback

    from qlora_kit.pipelines import train as train_module

    class NoSyncs(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (2, 4):
                torch.cuda.set_sync_debug_mode("error" if state.global_step == 2 else "default")

    trainer_class = train_module._trainer_class

    def watched():
        cls = trainer_class()

        class Watched(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(NoSyncs())

        return Watched

    monkeypatch.setattr(train_module, "_trainer_class", watched)
    recipe = make_recipe(
        tmp_path,
        word_model_dir,
        task_files,
        "training.max_steps=5",
        "training.logging_steps=5",
        "training.save_steps=5",
    )
    try:
        metrics = train_module.train(recipe)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metrics["train_steps"] == 5
