"""Memory levers change memory, not the result.

Optimizer-in-backward, offloaded adapters, offloaded checkpoints, CPU embeddings and
uncheckpointed layers.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.config import RecipeError
from qlora_kit.model.adapters import ADAPTER_WEIGHTS
from qlora_kit.pipelines.optim import OffloadedAdapters, full_precision_adapters
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


@pytest.mark.slow
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
    common = [
        "training.max_steps=6",
        "training.max_grad_norm=0",
        "training.optimizer=adamw",
        "data.test=null",
        "training.gradient_checkpointing=true",
        "training.lr_scheduler=cosine",
        "training.warmup_ratio=0.2",
    ]
    plain = make_recipe(tmp_path / "plain", untied_model_dir, task_files, *common)
    levers = make_recipe(
        tmp_path / "levers",
        untied_model_dir,
        task_files,
        *common,
        "training.optimizer_in_backward=true",
        "training.offload_activations=true",
        "training.offload_embeddings=true",
        "training.uncheckpointed_layers=1",
    )
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
        make_recipe(
            tmp_path / "a",
            tiny_model_dir,
            task_files,
            "training.optimizer_in_backward=true",
            "training.gradient_accumulation_steps=2",
        )
    with pytest.raises(RecipeError, match="gradient_checkpointing=true"):
        make_recipe(
            tmp_path / "b",
            tiny_model_dir,
            task_files,
            "training.offload_activations=true",
            "training.gradient_checkpointing=false",
        )
    with pytest.raises(RecipeError, match="optimizer_in_backward=true"):
        make_recipe(tmp_path / "d", tiny_model_dir, task_files, "training.offload_adapters=true")
    tied = make_recipe(tmp_path / "c", tiny_model_dir, task_files, "training.offload_embeddings=true")
    with pytest.raises(RecipeError, match="tied"):
        train(tied)


def _offloaded_layer():
    torch.manual_seed(1)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(7, 4)])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in model.layers[0].parameters()]
    return model, ref, OffloadedAdapters(model.layers[0], list(model.layers[0].parameters()))


def _master(p):
    """The fp32 master of an offloaded parameter."""
    with full_precision_adapters(torch.nn.ParameterList([p])):
        return p.detach().clone()


def test_offloaded_adapters_step_exactly_like_fp32_adamw():
    """Given the same gradients, the reassembled fp32 masters equal an fp32 AdamW's weights bit for bit."""
    model, ref, offloaded = _offloaded_layer()
    layer = model.layers[0]
    for p, r in zip(layer.parameters(), ref):
        assert p.numel() == 0  # nothing stays on the device between uses
        assert torch.equal(_master(p), r.detach())  # the halves lose nothing
    opt_ref = torch.optim.AdamW(ref, lr=0.05, weight_decay=0.01)
    opt = torch.optim.AdamW(offloaded.masters, lr=0.05, weight_decay=0.01)
    x = torch.randn(3, 7, dtype=torch.bfloat16)
    for _ in range(4):
        y = layer(x)  # with gradients: the bf16 high halves stay for backward
        truncated = ref[0].detach().view(torch.int32).bitwise_and(-65536).view(torch.float32)
        assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight.detach().float(), truncated)
        y.float().square().sum().backward()
        for p, r in zip(layer.parameters(), ref):
            r.grad = p.grad.float()
        opt_ref.step()
        offloaded.step(opt)
        for p, r in zip(layer.parameters(), ref):
            assert p.grad is None and p.numel() == 0
            assert torch.equal(_master(p), r.detach())


def test_offloaded_adapters_leave_after_a_forward_without_gradients():
    model, _, _ = _offloaded_layer()
    with torch.no_grad():
        model.layers[0](torch.randn(2, 7, dtype=torch.bfloat16))
    assert all(p.numel() == 0 for p in model.parameters())


def test_full_precision_adapters_for_saving_and_loading():
    model, ref, _ = _offloaded_layer()
    with full_precision_adapters(model):
        weight = model.layers[0].weight
        assert weight.dtype == torch.float32 and torch.equal(weight.detach(), ref[0].detach())
        weight.data.add_(1.0)  # as loading a checkpoint does
    assert model.layers[0].weight.numel() == 0
    assert torch.equal(_master(model.layers[0].weight), ref[0].detach() + 1.0)


@pytest.mark.slow
def test_offload_adapters_train(tmp_path, untied_model_dir, task_files, make_recipe):
    common = [
        "training.max_steps=6",
        "training.max_grad_norm=0",
        "training.optimizer=adamw",
        "data.test=null",
        "training.optimizer_in_backward=true",
        "training.gradient_checkpointing=true",
        "training.offload_activations=true",
        "training.offload_embeddings=true",
    ]
    plain = make_recipe(tmp_path / "plain", untied_model_dir, task_files, *common)
    offloaded = make_recipe(
        tmp_path / "offloaded", untied_model_dir, task_files, *common, "training.offload_adapters=true"
    )
    m_plain, m_offloaded = train(plain), train(offloaded)
    assert m_offloaded["after"]["val_loss"] < m_offloaded["before"]["val_loss"]
    assert abs(m_plain["after"]["val_loss"] - m_offloaded["after"]["val_loss"]) < 0.05 * m_plain["after"]["val_loss"]
    a = load_file(str(Path(plain.output.dir) / ADAPTER_WEIGHTS))
    b = load_file(str(Path(offloaded.output.dir) / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(b[k].dtype == torch.float32 for k in b)  # the fp32 masters are saved
    # The offloaded run's matmuls use the bf16 high halves: close to the fp32 run, not equal.
    for key in a:
        assert torch.allclose(a[key], b[key], atol=0.05), key


@pytest.mark.parametrize("numel,itemsize", [(1, 2), (1000, 2), (2**25, 2), (344064 * 4096, 2), (3 * 2**27 + 5, 4)])
def test_offloaded_pieces_are_powers_of_two_of_the_tensor_size(numel, itemsize):
    """torch's caching host allocator rounds blocks up to a power of two: the pieces waste under 64 MiB a tensor."""
    from qlora_kit.model.offload import _PIECE_MIN_BYTES, _piece_lengths

    lengths = _piece_lengths(numel, itemsize)
    assert sum(lengths) == numel
    sizes = [n * itemsize for n in lengths]
    assert sizes == sorted(sizes, reverse=True)
    pinned = sum(1 << (size - 1).bit_length() for size in sizes)  # what the allocator reserves
    assert pinned - numel * itemsize < _PIECE_MIN_BYTES
    assert all(size & (size - 1) == 0 for size in sizes[:-1])


def test_offloaded_tensor_comes_back_from_several_pieces(monkeypatch):
    from qlora_kit.model import offload

    monkeypatch.setattr(offload, "_PIECE_MIN_BYTES", 64)
    t = torch.randn(3, 37, 11, dtype=torch.bfloat16)
    held = offload._Offloaded(t)
    assert len(held.cpu) > 3 and sum(p.numel() for p in held.cpu) == t.numel()
    t_before = t.clone()
    t.zero_()  # the copy is the offloaded one, not a view of the input
    assert torch.equal(held.take(), t_before)


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("projections", [False, True])
def test_checkpoint_host_bytes_is_what_a_step_offloads(
    tmp_path, untied_model_dir, task_files, built_model, monkeypatch, attention, projections
):
    from qlora_kit.model import offload

    built = built_model(
        tmp_path,
        untied_model_dir,
        task_files,
        "training.offload_activations=true",
        f"training.recompute_attention={str(not attention).lower()}",
        f"training.recompute_projections={str(not projections).lower()}",
    )
    offloaded = []
    init = offload._Offloaded.__init__

    def counted(self, hidden, queued=True):
        offloaded.append(hidden.numel() * hidden.element_size())
        init(self, hidden, queued)

    monkeypatch.setattr(offload._Offloaded, "__init__", counted)
    ids = torch.randint(0, 1000, (3, 50))
    built.model(input_ids=ids, labels=ids)["loss"].backward()
    expected = offload.checkpoint_host_bytes(built.lm.config, 2, 3 * 50, torch.float32, attention, projections)
    assert sum(offloaded) == expected and len(offloaded) == (1 + 2 * attention + 4 * projections) * 2


def test_offloaded_checkpoints_beyond_the_host_memory_are_a_recipe_error(
    tmp_path, untied_model_dir, task_files, built_model, monkeypatch
):
    from qlora_kit.model import offload
    from qlora_kit.pipelines import builder

    monkeypatch.setattr(builder, "host_memory_available", lambda: 10**5)
    # 2 layers x 8 rows x 64 tokens x 64 hidden x 4 bytes (fp32 on the CPU) = 262,144 bytes
    for keep, message in [("true", r"of 2 layers need 0\.000262 GB .*max_seq_len=64 x training\.batch_size=8.* 0\.0001 GB av"),
                          ("false", "recompute_attention and training.recompute_projections to true")]:  # fmt: skip
        overrides = ["training.offload_activations=true", f"training.recompute_attention={keep}"]
        with pytest.raises(RecipeError, match=message):
            built_model(tmp_path / keep, untied_model_dir, task_files, *overrides)
    assert offload.host_memory_available() > 10**8  # this machine's /proc/meminfo


def test_offload_activations_auto_picks_the_kept_setting_where_it_applies(
    tmp_path, untied_model_dir, task_files, built_model, make_recipe, monkeypatch, caplog
):
    """training.offload_activations: auto (the default), as the builder decides it for a built model: offloaded
    with the attention and q/k/v/o outputs kept, for SFT on one CUDA GPU when half the host's available memory
    holds them (checkpoint_host_bytes); the checkpoints on the GPU otherwise, the reason logged."""
    from qlora_kit.model.offload import checkpoint_host_bytes
    from qlora_kit.pipelines import builder

    built = built_model(tmp_path, untied_model_dir, task_files)
    # make_recipe's recipe: 8 rows of 64 tokens; its 2 layers checkpointed.
    need = checkpoint_host_bytes(built.lm.config, 2, 8 * 64, torch.bfloat16, True, True)

    def choice(*overrides, available=10 * need, processes=1, sharded=False, device="cuda"):
        recipe = make_recipe(tmp_path / "r", untied_model_dir, task_files, *overrides)
        monkeypatch.setattr(builder, "host_memory_available", lambda: available)
        return builder.offload_choice(recipe, built.lm, torch.device(device), torch.bfloat16, processes, sharded)

    assert choice() == (True, True, True)
    assert choice(available=2 * need) == (True, True, True)
    with caplog.at_level("INFO", logger=builder.log.name):
        assert choice(available=2 * need - 2) == (False, False, False)
        assert f"they need {need / 1e9:.3g} GB of pinned CPU memory" in caplog.text
        assert choice(device="cpu") == (False, False, False)
        assert "training on cpu, not CUDA" in caplog.text
    assert choice(processes=2) == (False, False, False)  # DDP: one GPU each, but not what auto was measured on
    assert choice(available=None) == (False, False, False)
    assert choice(sharded=True) == (False, False, False)
    assert choice("training.recompute_attention=true") == (True, False, True)
    assert choice("training.recompute_projections=true") == (True, True, False)
    assert choice("qat.enabled=true") == (True, True, False)
    assert choice("model.attn_implementation=eager") == (True, False, True)
    assert choice("training.fp8_base_matmul=backward") == (True, False, False)
    # Set explicitly: as set, whatever the host holds.
    assert choice("training.offload_activations=false", available=None) == (False, False, False)
    assert choice("training.offload_activations=true") == (True, False, False)
    assert choice("training.offload_activations=true", "training.recompute_projections=false") == (True, False, True)
    with pytest.raises(RecipeError, match="training.offload_activations.*must be true, false, or 'auto'"):
        choice("training.offload_activations=maybe")
    with pytest.raises(RecipeError, match="recompute_attention=false keeps .* set training.offload_activations=true"):
        choice("training.recompute_attention=false")
