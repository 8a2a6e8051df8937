"""Optimizer-in-backward, offloaded checkpoints, CPU embeddings and uncheckpointed layers change memory, not the result."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.config import RecipeError
from qlora_kit.model.adapters import ADAPTER_WEIGHTS
from qlora_kit.pipelines.train import train


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with its own lm_head (embeddings can only be offloaded when untied)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-untied")
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_levers_give_the_same_adapters(tmp_path, untied_model_dir, task_files, make_recipe, monkeypatch):
    from qlora_kit.model import offload

    calls = {"recompute": 0, "embedding": 0}
    backward, embed = offload._OffloadedCheckpoint.backward, offload.CPUEmbedding.forward

    def counted_backward(ctx, grad):
        calls["recompute"] += 1
        return backward(ctx, grad)

    def counted_embed(self, ids):
        calls["embedding"] += 1
        return embed(self, ids)

    monkeypatch.setattr(offload._OffloadedCheckpoint, "backward", staticmethod(counted_backward))
    monkeypatch.setattr(offload.CPUEmbedding, "forward", counted_embed)
    common = ["training.max_steps=6", "training.max_grad_norm=0", "training.optimizer=adamw", "data.test=null",
              "training.gradient_checkpointing=true", "training.lr_scheduler=cosine",
              "training.warmup_ratio=0.2"]  # fmt: skip
    plain = make_recipe(tmp_path / "plain", untied_model_dir, task_files, *common)
    levers = make_recipe(tmp_path / "levers", untied_model_dir, task_files, *common, "training.optimizer_in_backward=true",
                         "training.offload_activations=true", "training.offload_embeddings=true",
                         "training.uncheckpointed_layers=1")  # fmt: skip
    m_plain = train(plain)
    assert calls == {"recompute": 0, "embedding": 0}
    m_levers = train(levers)
    assert calls["recompute"] == 1 * 6 and calls["embedding"] >= 6  # 1 checkpointed layer x 6 steps; plus evaluation
    assert m_levers["after"]["val_loss"] < m_levers["before"]["val_loss"]
    a = load_file(str(Path(plain.output.dir) / ADAPTER_WEIGHTS))
    b = load_file(str(Path(levers.output.dir) / ADAPTER_WEIGHTS))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert abs(m_plain["after"]["val_loss"] - m_levers["after"]["val_loss"]) < 1e-4


def test_lever_recipe_errors(tmp_path, tiny_model_dir, task_files, make_recipe):
    with pytest.raises(RecipeError, match="gradient_accumulation_steps must be 1"):
        make_recipe(tmp_path / "a", tiny_model_dir, task_files, "training.optimizer_in_backward=true",
                    "training.gradient_accumulation_steps=2")  # fmt: skip
    with pytest.raises(RecipeError, match="gradient_checkpointing=true"):
        make_recipe(tmp_path / "b", tiny_model_dir, task_files, "training.offload_activations=true",
                    "training.gradient_checkpointing=false")  # fmt: skip
    tied = make_recipe(tmp_path / "c", tiny_model_dir, task_files, "training.offload_embeddings=true")
    with pytest.raises(RecipeError, match="tied"):
        train(tied)
