"""The per-family layer plans against tiny random stock transformers models of each family.

A plan is only names; the reference is the transformers model itself: its nn.Linear modules,
and which tensors its linears, norms and blocks actually read in a forward pass.
"""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from qlora_kit.errors import UserInputError
from qlora_kit.model.load import SUPPORTED_MODEL_TYPES
from qlora_kit.model.plans import PLANS, LayerPlanError, layer_plan


def tiny_model(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,  # no grouped-query attention: v's output is o's input
        head_dim=16,
        vocab_size=64,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_every_supported_family_has_a_plan():
    assert set(PLANS) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(PLANS))
def test_plan_matches_the_stock_model(model_type):
    model = tiny_model(model_type)
    plan = layer_plan(model_type)
    assert len(set(plan.linears)) == len(plan.linears)
    for layer in model.model.layers:
        assert {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)} == set(plan.linears)
        plan.check(layer, model_type)

    # What each module of layer 1 is called with, and what each returns, in one forward pass.
    layer = model.model.layers[1]
    inputs, outputs = {}, {}
    watched = {n for g in plan.awq_groups for n in (g.prev, g.inspect)} | set(plan.linears)

    def keep(name):
        def pre(m, args, kwargs):
            inputs[name] = args[0] if args else kwargs["hidden_states"]

        def post(m, args, out):
            outputs[name] = out

        return pre, post

    for name in watched:
        pre, post = keep(name)
        layer.get_submodule(name).register_forward_pre_hook(pre, with_kwargs=True)
        layer.get_submodule(name).register_forward_hook(post)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0)))

    for group in plan.gptq_sequence:  # one Hessian per group: its linears read the same tensor
        for name in group:
            assert torch.equal(inputs[name], inputs[group[0]]), (group, name)
    assert sorted(n for g in plan.awq_groups for n in g.linears) == sorted(plan.linears)
    for g in plan.awq_groups:
        for name in g.linears:
            assert name == g.inspect or name.startswith(g.inspect + "."), (g, name)
            # The scale search feeds the inspected block's input to the linears.
            assert torch.equal(inputs[name], inputs[g.inspect]), (g, name)
            prev = layer.get_submodule(g.prev)
            if isinstance(prev, nn.Linear):  # v -> o: 1/s on v's output rows reaches o's input columns
                assert prev.out_features == layer.get_submodule(name).in_features
            else:  # a norm: its output is what the linears read
                assert torch.equal(outputs[g.prev], inputs[name]), (g, name)
    assert set(plan.awq_no_clip) <= set(plan.linears)


def test_unknown_family_and_foreign_layer_are_named():
    with pytest.raises(LayerPlanError, match=r"no decoder layer plan for model type 'gpt2'.*llama, mistral") as e:
        layer_plan("gpt2")
    assert isinstance(e.value, UserInputError)
    layer = tiny_model("llama").model.layers[0]
    layer.mlp.extra_proj = nn.Linear(64, 64)
    with pytest.raises(LayerPlanError, match=r"llama decoder layers hold linears \[.*'mlp.extra_proj'"):
        layer_plan("llama").check(layer, "llama")
