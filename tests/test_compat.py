"""The upstream shapes qlora_kit.compat relies on, one test each: an upstream release that
moves one fails here, by name, rather than somewhere inside a training run."""

import importlib
import inspect

import pytest
import torch
from torch import nn

from qlora_kit import compat
from qlora_kit.model.fused import FAMILIES


def test_trainer_has_the_private_hooks_we_override():
    from transformers import Trainer

    expected = {
        "_save": ["self", "output_dir", "state_dict"],
        "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
        "_save_optimizer_and_scheduler": ["self", "output_dir"],
        "_load_optimizer_and_scheduler": ["self", "checkpoint"],
        "_load_rng_state": ["self", "checkpoint"],
        "_save_checkpoint": ["self", "model", "trial"],
        "get_optimizer_cls_and_kwargs": ["args", "model"],  # a staticmethod
    }
    assert set(expected) == set(compat.TRAINER_HOOKS)
    for name, params in expected.items():
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == params, name


def test_check_trainer_hooks_names_a_vanished_hook():
    from transformers import Trainer

    class Ours(Trainer):
        def _save(self, output_dir=None, state_dict=None):
            pass

    assert compat.check_trainer_hooks(Ours) is Ours
    hook = Trainer._save
    try:
        del Trainer._save
        with pytest.raises(RuntimeError, match="_save"):
            compat.check_trainer_hooks(Ours)
    finally:
        Trainer._save = hook


def test_checkpoint_file_names():
    assert compat.checkpoint_file_names() == ("optimizer.pt", "scheduler.pt")


def test_accelerate_leaves_a_model_marked_prepared_as_it_is():
    from accelerate import Accelerator

    model = nn.Linear(2, 2)
    compat.mark_prepared(model)
    accelerator = Accelerator(cpu=True)
    assert accelerator.prepare(model) is model


def test_gradient_checkpointing_sets_a_per_layer_function(tiny_model_dir):
    import warnings

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # not through a name transformers deprecates
        compat.enable_checkpointing(model)
    layer = model.model.layers[0]
    assert callable(layer._gradient_checkpointing_func) and layer.gradient_checkpointing
    assert compat.checkpointed_layers(model) == list(model.model.layers)  # not the LlamaModel holding them
    model.model.layers[1].gradient_checkpointing = False
    assert compat.checkpointed_layers(model) == [layer]
    model.model.layers[1].gradient_checkpointing = True
    calls = []

    def checkpoint(run, *inputs):
        calls.append(1)
        return run(*inputs)

    for layer in model.model.layers:
        compat.set_checkpoint_function(layer, checkpoint)
    model.train()
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert len(calls) == len(model.model.layers)  # transformers calls it once per layer
    with pytest.raises(RuntimeError, match="_gradient_checkpointing_func"):
        compat.set_checkpoint_function(nn.Linear(2, 2), checkpoint)


def test_layerwise_dummy_optimizer_steps_nothing():
    p = nn.Parameter(torch.ones(2))
    inner = {p: torch.optim.SGD([p], lr=1.0)}
    dummy = compat.layerwise_dummy_optimizer(inner, lr=1.0)
    p.grad = torch.ones(2)
    dummy.step()
    assert torch.equal(p.detach(), torch.ones(2))
    assert dummy.optimizer_dict is inner


def test_bitsandbytes_optimizers_have_the_step_pieces():
    import bitsandbytes as bnb

    for cls in (bnb.optim.PagedAdamW8bit, bnb.optim.PagedAdamW32bit, bnb.optim.AdamW8bit):
        optimizer = cls([nn.Parameter(torch.zeros(4096))], lr=1e-3)
        for name in compat.BNB_STEP_PARTS:
            assert hasattr(optimizer, name), f"{cls.__name__}.{name}"
        for name in ("init_state", "update_step"):
            assert list(inspect.signature(getattr(optimizer, name)).parameters) == ["group", "p", "gindex", "pindex"]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_attention_forward_calls_the_rotary_global(model_type):
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    original = compat.rotary_function(modeling)
    forward = inspect.unwrap(getattr(modeling, f"{FAMILIES[model_type]}Attention").forward)
    # The forward looks the function up as a module global at call time: replacing it reaches the call.
    assert compat.ROTARY_GLOBAL in forward.__code__.co_names
    assert forward.__globals__ is vars(modeling)
    assert list(inspect.signature(getattr(original, "original", original)).parameters)[:4] == ["q", "k", "cos", "sin"]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_decoder_forward_calls_the_causal_mask_global_with_keywords(model_type):
    """The decoder's forward looks ``create_causal_mask`` up as a module global and passes everything by keyword,
    the attention mask and the KV cache among them: what the mask dispatcher reads."""
    import ast
    import textwrap

    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    original = compat.causal_mask_function(modeling)
    assert original is not None
    forward = inspect.unwrap(getattr(modeling, f"{FAMILIES[model_type]}Model").forward)
    assert forward.__globals__ is vars(modeling)
    assert list(inspect.signature(getattr(original, "original", original)).parameters)[0] == "config"
    tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    # Keyword dicts splatted into the call (Qwen's create_causal_mask(**mask_kwargs)), by variable name.
    dicts = {
        node.targets[0].id: {k.value for k in node.value.keys}
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and isinstance(node.targets[0], ast.Name)
    }
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == compat.MASK_GLOBAL]
    assert calls or compat.MASK_GLOBAL in forward.__code__.co_names  # Mistral's mask_function = create_causal_mask ...
    for call in calls:
        names = {k.arg for k in call.keywords if k.arg} | {
            key for k in call.keywords if k.arg is None for key in dicts.get(ast.unparse(k.value), ())
        }
        assert not call.args and {"config", "attention_mask"} <= names and names & set(compat.MASK_CACHE_KEYWORDS)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_attention_forward_looks_up_the_sdpa_function_when_called(model_type):
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    forward = inspect.unwrap(getattr(modeling, f"{FAMILIES[model_type]}Attention").forward)
    assert "ALL_ATTENTION_FUNCTIONS" in forward.__code__.co_names
    assert forward.__globals__["ALL_ATTENTION_FUNCTIONS"] is ALL_ATTENTION_FUNCTIONS
    original = compat.sdpa_attention_function()
    params = list(inspect.signature(getattr(original, "original", original)).parameters)
    assert params[:7] == ["module", "query", "key", "value", "attention_mask", "dropout", "scaling"]


def test_flash_attention_ops_have_the_schemas_we_call():
    def arguments(op):
        return [a.name for a in op.default._schema.arguments]

    aten = torch.ops.aten
    assert arguments(aten._scaled_dot_product_flash_attention) == [
        "query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale"
    ]  # fmt: skip
    assert arguments(aten._scaled_dot_product_flash_attention_backward) == [
        "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
        "dropout_p", "is_causal", "philox_seed", "philox_offset", "scale",
    ]  # fmt: skip
    assert arguments(aten._scaled_dot_product_flash_attention_for_cpu)[:5] == [
        "query", "key", "value", "dropout_p", "is_causal"
    ]  # fmt: skip
    assert arguments(aten._scaled_dot_product_flash_attention_for_cpu_backward)[:8] == [
        "grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal"
    ]  # fmt: skip


def test_rotary_function_names_a_missing_global():
    import types

    with pytest.raises(NotImplementedError, match="apply_rotary_pos_emb"):
        compat.rotary_function(types.ModuleType("transformers.models.x.modeling_x"))


def test_gguf_helpers_import_and_map_llama_names(tiny_model_dir):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    processors, default, weights_map, read_field = compat.gguf_tensor_mapping()
    config = AutoConfig.from_pretrained(tiny_model_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    processor = processors.get("llama", default)(config=config.to_dict())
    mapping = weights_map(model, processor)
    assert mapping["blk.0.attn_q.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert mapping["token_embd.weight"] == "model.embed_tokens.weight"
    assert callable(read_field)


def _launch_call_args(function, receiver: str) -> list[str]:
    """The arguments, as source, of the ``<receiver>.run(...)`` call in ``function``'s source."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "run"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == receiver
    ]
    assert len(calls) == 1, f"{function.__qualname__} calls {receiver}.run {len(calls)} times"
    return [ast.unparse(arg) for arg in calls[0].args]


def test_triton_launches_compiled_kernels_the_way_compat_does():
    """compat.triton_compiled_launcher calls CompiledKernel.run as triton's own two launch paths do:
    the launch arguments of COMPILED_KERNEL_LAUNCH, then every argument of the JIT function."""
    pytest.importorskip("triton")
    from triton.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction

    jit_run = _launch_call_args(JITFunction.run, "kernel")
    hooks = ["knobs.runtime.launch_enter_hook", "knobs.runtime.launch_exit_hook"]
    assert jit_run == [
        "grid_0",
        "grid_1",
        "grid_2",
        "stream",
        "kernel.function",
        "kernel.packed_metadata",
        "launch_metadata",
        *hooks,
        "*bound_args.values()",  # the bound parameters, constexprs included
    ]
    runner = _launch_call_args(CompiledKernel.__getitem__, "self")
    assert runner == [
        "grid[0]",
        "grid[1]",
        "grid[2]",
        "stream",
        "self.function",
        "self.packed_metadata",
        "launch_metadata",
        *hooks,
        "*args",
    ]
    assert [a.rpartition(".")[2].replace("[", "_").rstrip("]") for a in runner[:-1]] == list(
        compat.COMPILED_KERNEL_LAUNCH
    )
    assert isinstance(inspect.getattr_static(CompiledKernel, "run"), property)  # loads the module on first use
    import triton

    assert not compat._launch_hooks_set(triton.knobs.runtime)  # no profiler attached: the direct launch


def test_triton_autotuner_records_the_config_it_ran():
    pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    source = inspect.getsource(Autotuner.run)
    assert "self.best_config = config" in source
    assert "**config.all_kwargs()" in source  # the launch keywords kernels/nf4.py repeats


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _affine(x_ptr, out_ptr, n, BLOCK: tl.constexpr, SCALE: tl.constexpr, shift):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n) * SCALE + shift, mask=i < n)

except ImportError:
    triton = None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_compiled_launcher_runs_what_the_jit_compiled():
    n, block = 1000, 256
    x = torch.arange(n, device="cuda", dtype=torch.float32)
    expected = x * 3 + 0.5  # exact in fp32
    grid = (triton.cdiv(n, block),)
    kernel = _affine.warmup(x, torch.empty_like(x), n, BLOCK=block, SCALE=3, shift=0.5, grid=grid)
    launch = compat.triton_compiled_launcher(kernel, grid)
    assert launch is not None
    out = torch.zeros_like(x)
    launch(x, out, n, block, 3, 0.5)  # constexprs in place, between the runtime arguments
    assert torch.equal(out, expected)
    # On the current stream: a CUDA graph captures it.
    out.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(x, out, n, block, 3, 0.5)
    assert not out.any()
    graph.replay()
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
def test_scaled_mm_takes_rowwise_scales(device):
    """torch._scaled_mm with e4m3 operands, [M, 1] and [1, N] fp32 scales (CUDA), and our fp32 emulation
    elsewhere: both equal the float64 product of the scaled operands."""
    from qlora_kit.compat import scaled_mm

    assert callable(getattr(torch, "_scaled_mm", None))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 64, generator=g).to(torch.float8_e4m3fn).to(device)
    b = torch.randn(48, 64, generator=g).to(torch.float8_e4m3fn).to(device)
    sa, sb = torch.rand(32, 1, generator=g).to(device), torch.rand(1, 48, generator=g).to(device)
    y = scaled_mm(a, b.t(), sa, sb, torch.float32)
    ref = (a.double() * sa.double()) @ (b.double().t() * sb.double())
    assert y.dtype == torch.float32 and torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
