"""The tiled MLP computes what the MLP computes, a chunk of tokens at a time.

References: the same MLP run whole by plain autograd, in float64 (outputs, input gradients and
LoRA A/B gradients to ~1e-12); inside gradient-checkpointed and offload-checkpointed decoder
layers; and the builder's model trained with training.mlp_chunk_tokens on and off.
"""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_kit.compat import enable_checkpointing
from qlora_kit.config import RecipeError
from qlora_kit.model.adapters import add_lora
from qlora_kit.model.offload import use_offloaded_checkpointing
from qlora_kit.modules import tiled_mlp
from qlora_kit.modules.tiled_mlp import AUTO_CHUNK_TOKENS, AUTO_MIN_TOKENS, _TiledMLP, chunk_length, use_tiled_mlp

HIDDEN, INTERMEDIATE = 24, 40


@pytest.fixture
def backward_calls(monkeypatch):
    """The chunk lengths of the tiled MLP backward passes run."""
    calls = []
    backward = _TiledMLP.backward

    def counted(ctx, grad):
        calls.append(ctx.chunk)
        return backward(ctx, grad)

    monkeypatch.setattr(_TiledMLP, "backward", staticmethod(counted))
    return calls


def tiny_llama(dropout: float = 0.0, layers: int = 2) -> LlamaForCausalLM:
    """A float64 Llama with LoRA on every decoder linear, B not zero (so A gets gradients)."""
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").double()
    model.requires_grad_(False)
    add_lora(model, r=4, alpha=8, dropout=dropout)
    model.double()
    for name, p in model.named_parameters():
        if name.endswith("lora_B.weight"):
            p.data.normal_(0, 0.2)
    model.config.use_cache = False
    return model.train()


def lora_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())  # A and B both get gradients
    return grads


def mlp_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """Output, input gradient and LoRA gradients of layer.mlp on x."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer.mlp(x)
    y.backward(grad)
    return y.detach(), x.grad, lora_grads(layer.mlp)


def assert_close(a, b, tol=1e-12):
    assert torch.allclose(a, b, rtol=0, atol=tol), (a - b).abs().max()


@pytest.mark.parametrize("chunk", [1, 3, 8, 22, 64])
def test_tiled_mlp_matches_the_mlp_in_float64(chunk):
    layer = tiny_llama().model.layers[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64, generator=g)  # 22 tokens: 3 and 8 do not divide it
    grad = torch.randn(2, 11, HIDDEN, dtype=torch.float64, generator=g)
    ref_y, ref_gx, ref_grads = mlp_step(layer, x, grad)

    tiled = copy.deepcopy(layer)
    assert use_tiled_mlp(tiled, chunk) == 1
    y, gx, grads = mlp_step(tiled, x, grad)
    assert_close(y, ref_y)
    assert_close(gx, ref_gx)
    assert grads.keys() == ref_grads.keys() and len(grads) == 6  # A and B of gate, up and down
    for name in grads:
        assert_close(grads[name], ref_grads[name])


@pytest.mark.parametrize("chunk", [3, 22, 100])
def test_the_autograd_function_in_one_or_more_chunks(chunk):
    """The function itself, also with one chunk holding every token (the module skips it then)."""
    layer = tiny_llama().model.layers[0]
    x = torch.randn(22, HIDDEN, dtype=torch.float64)
    grad = torch.randn(22, HIDDEN, dtype=torch.float64)
    ref_y, ref_gx, ref_grads = mlp_step(layer, x, grad)
    layer.zero_grad(set_to_none=True)
    xt = x.clone().requires_grad_(True)
    params = [p for p in layer.mlp.parameters() if p.requires_grad]
    y = _TiledMLP.apply(layer.mlp.forward, chunk, False, xt, *params)
    y.backward(grad)
    assert_close(y.detach(), ref_y)
    assert_close(xt.grad, ref_gx)
    for name, g in lora_grads(layer.mlp).items():
        assert_close(g, ref_grads[name])


def test_only_chunks_of_the_intermediate_exist():
    """Forward keeps only the input; backward keeps one chunk's intermediates at a time."""
    layer = tiny_llama().model.layers[0]
    tiled = copy.deepcopy(layer)
    use_tiled_mlp(tiled, 5)
    x = torch.randn(30, HIDDEN, dtype=torch.float64, requires_grad=True)
    saved = []
    weights = {s for p in layer.parameters() for s in (p.shape, p.shape[::-1])}

    def pack(t):
        if t.shape not in weights:  # the weights (and their transposes) are saved too
            saved.append(t.shape)
        return t

    def rows_of_intermediates():
        return [s[0] for s in saved if s[-1] == INTERMEDIATE]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer.mlp(x)
    assert max(rows_of_intermediates()) == 30  # the plain MLP saves [tokens, intermediate] tensors
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = tiled.mlp(x)
        assert saved == [x.shape]
        y.sum().backward()  # on the CPU the backward runs in this thread, under the hooks
    assert rows_of_intermediates() and max(rows_of_intermediates()) == 5


def test_dropout_masks_of_the_forward_are_replayed_in_backward():
    """With LoRA dropout, the gradients are those of the masks the forward drew."""
    layer = tiny_llama(dropout=0.3).model.layers[0]
    tiled = copy.deepcopy(layer)
    use_tiled_mlp(tiled, 4)
    x = torch.randn(10, HIDDEN, dtype=torch.float64)
    grad = torch.randn(10, HIDDEN, dtype=torch.float64)
    torch.manual_seed(5)
    y, gx, grads = mlp_step(tiled, x, grad)
    # The reference draws the same masks: chunk by chunk from the same RNG state, by plain autograd.
    torch.manual_seed(5)
    layer.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    ref_y = torch.cat([layer.mlp(xr[i : i + 4]) for i in range(0, 10, 4)])
    ref_y.backward(grad)
    with torch.no_grad():
        assert not torch.allclose(y, copy.deepcopy(layer).eval().mlp(x))  # the dropout drops something
    assert_close(y, ref_y.detach())
    assert_close(gx, xr.grad)
    for name, g in lora_grads(layer.mlp).items():
        assert_close(grads[name], g)


@pytest.mark.parametrize("checkpointing", ["torch", "offloaded"])
@pytest.mark.parametrize("chunk", [3, 8])
def test_inside_checkpointed_layers(checkpointing, chunk, backward_calls):
    """The layer's recomputation re-enters the tiled MLP; loss and every LoRA gradient are unchanged."""
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(2))
    results = []
    for tile in (False, True):
        model = tiny_llama()
        enable_checkpointing(model)
        if checkpointing == "offloaded":
            use_offloaded_checkpointing(model)
        if tile:
            assert use_tiled_mlp(model, chunk) == 2
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), lora_grads(model)))
    assert backward_calls == [chunk, chunk]  # once per layer, in the tiled run
    (ref_loss, ref_grads), (loss, grads) = results
    assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(grads[name], ref_grads[name])


def test_chunk_length():
    assert chunk_length(8, 8) is None and chunk_length(8, 9) == 8 and chunk_length(3, 100) == 3
    assert chunk_length("auto", AUTO_MIN_TOKENS) is None
    assert chunk_length("auto", AUTO_MIN_TOKENS + 1) == AUTO_CHUNK_TOKENS
    model = tiny_llama()
    with pytest.raises(ValueError, match="positive number of tokens or 'auto'"):
        use_tiled_mlp(model, 0)
    with pytest.raises(ValueError, match="no decoder layer"):
        use_tiled_mlp(nn.Linear(2, 2), 8)


def test_auto_tiles_long_calls_only_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(tiled_mlp, "AUTO_MIN_TOKENS", 12)
    monkeypatch.setattr(tiled_mlp, "AUTO_CHUNK_TOKENS", 5)
    monkeypatch.setattr(tiled_mlp, "_auto_logged", False)
    calls = []
    apply = _TiledMLP.apply
    monkeypatch.setattr(_TiledMLP, "apply", lambda *a: calls.append(a[1]) or apply(*a))
    layer = tiny_llama().model.layers[0]
    use_tiled_mlp(layer, "auto")
    with caplog.at_level("INFO", logger="qlora_kit.modules.tiled_mlp"):
        for tokens in (12, 13, 20):
            layer.mlp(torch.randn(tokens, HIDDEN, dtype=torch.float64))
    assert calls == [5, 5]
    assert sum("chunks of 5 tokens" in r.message for r in caplog.records) == 1


LEVERS = [
    ["training.offload_activations=true"],
    # The in-backward optimizer steps from gradient-accumulation hooks: one gradient per tensor, not per chunk.
    ["training.optimizer_in_backward=true", "training.offload_adapters=true", "training.optimizer=adamw"],
]


@pytest.mark.parametrize("levers", LEVERS)
def test_recipe_key_trains_like_the_untiled_model(
    tmp_path, tiny_model_dir, task_files, make_recipe, backward_calls, levers
):
    """build_training_model with training.mlp_chunk_tokens (fused ops, NF4 LoRA, memory levers)."""
    from qlora_kit.model.sources import resolve_source
    from qlora_kit.pipelines.builder import build_training_model

    source = resolve_source(str(tiny_model_dir))
    ids = torch.randint(0, 1000, (3, 2, 24), generator=torch.Generator().manual_seed(3))
    runs = {}
    for chunk in (0, 7, "auto") if levers == LEVERS[0] else (0, 7):
        recipe = make_recipe(
            tmp_path / str(chunk),
            tiny_model_dir,
            task_files,
            f"training.mlp_chunk_tokens={chunk}",
            "training.learning_rate=1e-2",
            *levers,
        )
        built = build_training_model(recipe, "cpu", source=source, total_steps=3, progress=False)
        mlp = built.lm.model.layers[0].mlp
        assert getattr(mlp, "mlp_chunk_tokens", 0) == chunk
        built.model.train()
        params = [p for p in built.model.parameters() if p.requires_grad]
        optimizer = built.optimizers[0] or torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for batch in ids:
            loss = built.model(input_ids=batch, labels=batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs[chunk] = torch.tensor(losses)
    assert backward_calls == [7] * 2 * 3  # 2 layers, 3 steps, only with mlp_chunk_tokens=7
    assert len(set(runs[0].tolist())) == 3  # the steps changed the adapters
    assert torch.allclose(runs[7], runs[0], rtol=1e-5)
    if "auto" in runs:
        assert torch.equal(runs["auto"], runs[0])  # 48 tokens per call: auto leaves the MLPs whole


@pytest.mark.parametrize("value", ["-1", "yes", "true", "1.5"])
def test_bad_recipe_values(tmp_path, tiny_model_dir, task_files, make_recipe, value):
    with pytest.raises(RecipeError, match="training.mlp_chunk_tokens"):
        make_recipe(tmp_path, tiny_model_dir, task_files, f"training.mlp_chunk_tokens={value}")
