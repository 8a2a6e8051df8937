"""use_fused_ops on tiny random Llama-family models: same logits and gradients as the stock model.

Each test runs one forward and backward pass of a tiny model (2 decoder layers, hidden 96,
head_dim 24, LoRA on every decoder linear, non-reentrant gradient checkpointing) with and without
the fused ops and compares logits, the input-embedding gradient and every LoRA gradient. The torch path (what
runs on the CPU) must reproduce the stock model; the Triton path runs under the interpreter
without CUDA.
"""

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import qlora_kit.model.fused as fused  # noqa: E402
from qlora_kit.compat import enable_checkpointing  # noqa: E402
from qlora_kit.model.adapters import add_lora  # noqa: E402
from qlora_kit.model.fused import use_fused_ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYERS = 2


def tiny_model(model_type: str, seed: int = 0):
    """A random model with random norm weights and LoRA adapters whose B is not zero (so A gets gradients)."""
    config = AutoConfig.for_model(
        model_type,
        hidden_size=96,
        intermediate_size=176,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(DEVICE)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.uniform_(0.5, 1.5)
    model.requires_grad_(False)
    add_lora(model, r=4, alpha=8)
    for name, p in model.named_parameters():
        if name.endswith("lora_B.weight"):
            p.data.normal_(0, 0.1)
    model.config.use_cache = False
    enable_checkpointing(model)
    return model.train()


def step(model, seed: int = 1, batch: int = 2, seq: int = 9):
    """Logits, the input-embedding gradient and the LoRA gradients of one backward pass."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(DEVICE)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    (logits * torch.randn(logits.shape, generator=g).to(DEVICE)).sum().backward()
    lora_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert lora_grads and all(grad is not None and grad.abs().sum() > 0 for grad in lora_grads.values())
    return logits.detach(), embeds.grad, lora_grads


def assert_same_step(ours, stock, rtol: float, atol: float):
    (logits, embeds_grad, lora_grads), (s_logits, s_embeds_grad, s_lora_grads) = ours, stock
    torch.testing.assert_close(logits, s_logits, rtol=rtol, atol=atol)
    torch.testing.assert_close(embeds_grad, s_embeds_grad, rtol=rtol, atol=atol)
    assert lora_grads.keys() == s_lora_grads.keys()
    for name in lora_grads:
        torch.testing.assert_close(lora_grads[name], s_lora_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture
def fused_rotary_calls(monkeypatch):
    """Counts the calls that reach the fused rotary op."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return apply_rotary(*args, **kwargs)

    apply_rotary = fused.apply_rotary
    monkeypatch.setattr(fused, "apply_rotary", counting)
    return calls


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_torch_path_matches_stock_model(model_type, fused_rotary_calls):
    stock = tiny_model(model_type)
    ours = use_fused_ops(copy.deepcopy(stock), kernel="torch")
    # Every norm (Qwen3's q_norm/k_norm included), MLP and attention is switched; nothing else.
    switched = [m for m in ours.modules() if "fused_kernel" in vars(m)]
    per_layer = 2 + 1 + 1 + (2 if model_type == "qwen3" else 0)
    assert len(switched) == LAYERS * per_layer + 1
    assert_same_step(step(ours), step(stock), rtol=1e-6, atol=1e-6)
    # The fused rotary runs in the switched model only: once per layer, and again when the
    # checkpointed layer is recomputed in the backward.
    assert len(fused_rotary_calls) == 2 * LAYERS
    step(stock)
    assert len(fused_rotary_calls) == 2 * LAYERS


def relative_errors(result, exact) -> dict[str, float]:
    """Relative Frobenius error of logits, the input gradient and all LoRA gradients together."""

    def parts(r):
        logits, embeds_grad, lora_grads = r
        return logits.double(), embeds_grad.double(), torch.cat([g.double().flatten() for g in lora_grads.values()])

    names = ("logits", "input grad", "LoRA grads")
    return {n: ((o - e).norm() / e.norm()).item() for n, o, e in zip(names, parts(result), parts(exact))}


def test_triton_path_matches_stock_model(fused_rotary_calls):
    """In fp32, the fused Triton model is as close to the float64 model as the stock fp32 model is.

    Against a float64 reference rather than the stock fp32 model: the two fp32 models round
    differently (summation order, BLAS kernels of the CPU or GPU), so comparing them directly
    tests the rounding, not the kernels.
    """
    stock = tiny_model("qwen3", seed=2)
    ours = use_fused_ops(copy.deepcopy(stock), kernel="triton")
    exact = step(copy.deepcopy(stock).double(), seq=7)
    ours_err, stock_err = relative_errors(step(ours, seq=7), exact), relative_errors(step(stock, seq=7), exact)
    for name, err in ours_err.items():
        # A wrong kernel is off by 1e-2 or more; fp32 rounding leaves ~1e-7.
        assert err <= max(4 * stock_err[name], 1e-6), f"{name}: error {err:.3g}, stock fp32 {stock_err[name]:.3g}"
    assert len(fused_rotary_calls) == 2 * LAYERS


def test_triton_path_under_bf16_autocast():
    """The mixed dtypes autocast makes (fp32 residual stream, bf16 projections and attention).

    Against the same model in fp32, the fused model's error is at most twice the stock
    model's under the same autocast (relative Frobenius error: logits, the input gradient,
    all LoRA gradients together).
    """
    stock = tiny_model("llama", seed=3)
    ours = use_fused_ops(copy.deepcopy(stock), kernel="triton")
    exact = step(copy.deepcopy(stock), seq=7)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        results = step(ours, seq=7), step(stock, seq=7)
    assert results[0][0].dtype == results[1][0].dtype

    ours_err, stock_err = relative_errors(results[0], exact), relative_errors(results[1], exact)
    for name, err in ours_err.items():
        assert err <= 2 * stock_err[name], f"{name}: error {err:.3g}, stock {stock_err[name]:.3g}"


def test_fused_forwards_follow_copies_and_wrappers(tmp_path):
    """deepcopy rebinds the switched forwards; use_fused_ops reaches a model inside DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    stock = tiny_model("llama", seed=4)
    copied = copy.deepcopy(use_fused_ops(copy.deepcopy(stock), kernel="torch"))
    mlp = copied.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = use_fused_ops(DistributedDataParallel(copy.deepcopy(stock)), kernel="torch")
        assert ddp.module.model.norm.fused_kernel == "torch"
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(0, 128, (2, 9), generator=g).to(DEVICE)
        ddp(input_ids=ids).logits.sum().backward()
        stock(input_ids=ids).logits.sum().backward()
        for (name, p), s in zip(ddp.module.named_parameters(), stock.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, s.grad, rtol=1e-6, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


def test_rejects_unsupported_models():
    with pytest.raises(ValueError, match="supported"):
        use_fused_ops(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="kernel"):
        use_fused_ops(tiny_model("llama"), kernel="cuda")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_causal_only_makes_no_mask_and_trains_as_the_stock_model(model_type, monkeypatch):
    """The SFT loss over a batch without attention mask or position ids: the switched model's decoder makes no
    causal mask (transformers' own mask maker is not called, nor its look at the position ids on the device),
    and the loss and LoRA gradients are the stock model's; with an attention mask the mask maker runs."""
    import sys

    from qlora_kit.model.sft import causal_lm_loss

    stock = tiny_model(model_type).to(torch.float64)
    stock.config.sliding_window = None  # Mistral's default window makes its masks with the sliding-window maker
    ours = use_fused_ops(copy.deepcopy(stock), kernel="torch")
    modeling = sys.modules[type(ours.model).__module__]
    made = []
    original = modeling.create_causal_mask.original
    monkeypatch.setattr(
        modeling, "create_causal_mask", fused._mask_dispatcher(lambda *a, **k: made.append(1) or original(*a, **k))
    )
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    labels = ids.clone()
    labels[0, :4] = -100

    def loss_and_grads(model, **inputs):
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, ids, labels, chunk_tokens=5, **inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(ours)
    assert made == []
    stock_loss, stock_grads = loss_and_grads(stock)
    torch.testing.assert_close(loss, stock_loss, rtol=1e-12, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    loss_and_grads(ours, attention_mask=torch.ones_like(ids))
    assert made == [1]  # once a forward, before the layers
