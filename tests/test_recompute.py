"""A checkpointed layer's recompute leaves out the outputs nothing reads (qlora_kit/model/recompute.py)."""

import pytest
import torch

from qlora_kit.model.plans import LLAMA, AWQGroup, LayerPlan
from qlora_kit.modules import kept, lora, nf4_linear
from qlora_kit.modules.unread import MARK


def _marked(lm, mark: str = MARK) -> list[str]:
    return [name for name, m in lm.named_modules() if getattr(m, mark, False)]


def _step(built, ids, monkeypatch):
    """Loss and LoRA gradients of one forward and backward; the base GEMMs that ran, by NF4 layer name."""
    names = {m: n for n, m in built.lm.named_modules() if isinstance(m, nf4_linear.NF4Linear)}
    ran = []
    original = nf4_linear.base_matmul
    for module in (lora, nf4_linear):
        monkeypatch.setattr(
            module, "base_matmul", lambda x, base, **kw: ran.append(names[base]) or original(x, base, **kw)
        )
    built.model.zero_grad(set_to_none=True)
    loss = built.model(input_ids=ids, labels=ids)["loss"]
    loss.backward()
    monkeypatch.undo()
    grads = {n: p.grad.clone() for n, p in built.lm.named_parameters() if p.grad is not None}
    return loss.detach(), grads, ran


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("training.offload_activations=true",),
        ("training.mlp_chunk_tokens=24",),  # the tiled MLP: chunks of 24 of 2 x 40 tokens
        ("training.mlp_chunk_tokens=24", "training.offload_activations=true"),
        # down_proj a bare NF4Linear; offloaded: torch's own checkpoint stops its recompute at the last
        # saved tensor, before a down_proj that saves none, while the offloaded one runs the whole layer.
        ("lora.target_modules=[q_proj,v_proj]", "training.offload_activations=true"),
    ],
    ids=["checkpointed", "offloaded", "tiled-mlp", "tiled-mlp-offloaded", "no-lora-on-down"],
)
def test_recompute_skips_down_proj_with_the_same_gradients(
    tmp_path, tiny_model_dir, task_files, built_model, monkeypatch, overrides
):
    """Each checkpointed layer's down_proj GEMM runs once a step (the forward), not twice (a tiled MLP: none of
    its GEMMs in the checkpoint's recompute), and the loss and every LoRA gradient are bit for bit those of
    the recompute that computes them."""
    built = built_model(tmp_path, tiny_model_dir, task_files, *overrides)
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    tiled = "training.mlp_chunk_tokens=24" in overrides
    marked = _marked(built.lm)
    per_layer = ["mlp", "mlp.down_proj"] if tiled else ["mlp.down_proj"]
    assert marked == [f"model.layers.{i}.{name}" for i in range(2) for name in per_layer]
    loss, grads, ran = _step(built, ids, monkeypatch)
    for name in marked:
        setattr(built.lm.get_submodule(name), MARK, False)
    loss_full, grads_full, ran_full = _step(built, ids, monkeypatch)

    def runs(names, projection):
        return sum(f".{projection}" in n for n in names)

    # Per layer and chunk (80 tokens in chunks of 24: 4), the forward, the checkpoint's recompute and the
    # tiled MLP's own recompute of each chunk in backward. Marked: down_proj only in the forward; a tiled
    # MLP's recompute in the checkpoint runs none of its projections (its backward recomputes them).
    chunks = 4 if tiled else 1
    assert runs(ran_full, "down_proj") == 2 * chunks * (3 if tiled else 2)
    assert runs(ran, "down_proj") == 2 * chunks
    for projection in ("gate_proj", "up_proj"):
        assert runs(ran_full, projection) == 2 * chunks * (3 if tiled else 2)
        assert runs(ran, projection) == 2 * chunks * 2
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert runs(ran, projection) == runs(ran_full, projection) == 2 * 2
    assert torch.equal(loss, loss_full)
    assert grads.keys() == grads_full.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], grads_full[name]), name


def test_uncheckpointed_layers_and_the_plain_path_are_not_marked(tmp_path, tiny_model_dir, task_files, built_model):
    built = built_model(tmp_path / "a", tiny_model_dir, task_files, "training.uncheckpointed_layers=1")
    assert _marked(built.lm) == ["model.layers.0.mlp.down_proj"]
    built = built_model(tmp_path / "b", tiny_model_dir, task_files, "training.fused_kernels=false")
    assert _marked(built.lm) == []
    built = built_model(tmp_path / "c", tiny_model_dir, task_files, "training.gradient_checkpointing=false")
    assert _marked(built.lm) == []


def test_an_unread_linear_outside_the_layer_is_refused():
    with pytest.raises(ValueError, match="recompute_unread"):
        LayerPlan(LLAMA.gptq_sequence, LLAMA.awq_groups, recompute_unread=("mlp.out_proj",))
    assert LayerPlan((("a",),), (AWQGroup("norm", ("a",), "a"),), recompute_unread=("a",)).recompute_unread == ("a",)


@pytest.mark.parametrize(
    "overrides",
    [(), ("lora.target_modules=[q_proj,v_proj]",), ("training.mlp_chunk_tokens=24",)],
    ids=["lora-everywhere", "k-and-o-without-lora", "tiled-mlp"],
)
def test_kept_projections_skip_their_gemms_with_the_same_gradients(
    tmp_path, tiny_model_dir, task_files, built_model, monkeypatch, overrides
):
    """training.recompute_projections=false: each checkpointed layer's q, k, v and o GEMMs run once a step
    (the forward), their outputs kept with the offloaded checkpoint, and the loss and every LoRA gradient are
    bit for bit those of the recompute that computes them again."""
    built = built_model(
        tmp_path,
        tiny_model_dir,
        task_files,
        "training.offload_activations=true",
        "training.recompute_projections=false",
        *overrides,
    )
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    marked = _marked(built.lm, kept.MARK)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert marked == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in projections]
    loss, grads, ran = _step(built, ids, monkeypatch)
    for name in marked:
        setattr(built.lm.get_submodule(name), kept.MARK, False)
    loss_full, grads_full, ran_full = _step(built, ids, monkeypatch)
    for projection in projections:
        assert sum(f".{projection}" in n for n in ran) == 2  # two layers, the forward only
        assert sum(f".{projection}" in n for n in ran_full) == 2 * 2
    assert torch.equal(loss, loss_full)
    assert grads.keys() == grads_full.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], grads_full[name]), name


def test_kept_projections_need_offloaded_nf4_checkpoints(tmp_path, tiny_model_dir, task_files, built_model):
    from qlora_kit.config import RecipeError

    with pytest.raises(RecipeError, match="recompute_projections=false keeps .* set training.offload_activations=true"):
        built_model(tmp_path / "a", tiny_model_dir, task_files, "training.recompute_projections=false")
    keep = ["training.offload_activations=true", "training.recompute_projections=false"]
    with pytest.raises(RecipeError, match="NF4 linears"):
        built_model(tmp_path / "b", tiny_model_dir, task_files, *keep, "training.fused_kernels=false")
    built = built_model(tmp_path / "c", tiny_model_dir, task_files, *keep, "training.uncheckpointed_layers=1")
    assert _marked(built.lm, kept.MARK) == [
        f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
