"""FSDP: NF4 storage that survives sharding, and 2 CPU processes (gloo) through accelerate = 1 process, 2x accumulation."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from qlora_kit.model.adapters import (
    ADAPTER_WEIGHTS,
    add_lora,
    load_adapter_weights,
    lora_modules,
    lora_state_dict,
    peft_config,
    save_adapter,
)
from qlora_kit.model.fsdp import (
    FSDPConfigError,
    fsdp_plugin_from_launch,
    full_optimizer_state,
    full_tensor,
    nf4_storage_bytes,
    shard_model,
    shard_optimizer_state,
)
from qlora_kit.model.load import load_quantized
from qlora_kit.model.sft import SFTModel
from qlora_kit.modules.nf4_linear import NF4_STORAGE, QUANT_STORAGE_DTYPES, NF4Linear
from qlora_kit.pipelines.train import train
from qlora_kit.quant.nf4 import quantize_nf4


@pytest.mark.parametrize("dtype", QUANT_STORAGE_DTYPES)
def test_parameter_storage_holds_the_same_bits(dtype):
    # 97 x 67: odd byte counts everywhere, so every storage dtype needs padding.
    layer = NF4Linear(quantize_nf4(torch.randn(97, 67)), torch.randn(97), compute_dtype=torch.float32)
    x = torch.randn(3, 67)
    expected_y, expected = layer(x), layer.nf4_weight
    layer.set_quant_storage(dtype)
    assert not list(layer.buffers())
    assert {n for n, p in layer.named_parameters()} == {*NF4_STORAGE, "bias"}
    assert all(
        p.dtype == dtype and p.dim() == 1 and not p.requires_grad for n, p in layer.named_parameters() if n != "bias"
    )
    for field in ("packed", "absmax_q", "nested_absmax", "offset"):
        assert torch.equal(getattr(layer.nf4_weight, field), getattr(expected, field)), field
    assert torch.equal(layer(x), expected_y)
    layer.set_quant_storage(None)  # back to buffers
    assert {n for n, _ in layer.named_buffers()} == set(NF4_STORAGE)
    assert torch.equal(layer(x), expected_y)


def test_cast_storage_is_refused():
    layer = NF4Linear(
        quantize_nf4(torch.randn(64, 64)), None, compute_dtype=torch.float32, quant_storage=torch.bfloat16
    )
    layer.to(torch.float16)  # converts the values: the bytes are gone
    with pytest.raises(RuntimeError, match="cast from torch.bfloat16 to torch.float16"):
        layer(torch.randn(2, 64))


def test_unsupported_accelerate_settings_are_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert fsdp_plugin_from_launch() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_plugin_from_launch().fsdp_version == 2
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(FSDPConfigError, match="fsdp_activation_checkpointing"):
        fsdp_plugin_from_launch()
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(FSDPConfigError, match="fsdp_version: 2"):
        fsdp_plugin_from_launch()


def _sharding_worker(rank: int, port: int, model_dir: str, adapter_dir: str) -> None:
    """One of 2 gloo processes: shard the tiny model and compare everything with the unsharded one."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same model in both processes
        lm = load_quantized(model_dir, device="cpu", compute_dtype="float32", progress=False)
        add_lora(lm, r=4, alpha=8)
        for m in lora_modules(lm).values():
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
        model = SFTModel(lm)
        ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(rank))  # each its own batch
        loss = model(input_ids=ids, labels=ids)["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        for g in grads.values():
            dist.all_reduce(g)  # DDP would average these sums
        weights = {n: m.dequantized_weight() for n, m in lm.named_modules() if isinstance(m, NF4Linear)}
        model.zero_grad(set_to_none=True)

        shard_model(model, lm.model.layers, quant_storage=torch.bfloat16)
        local, total = nf4_storage_bytes(lm)
        padding = len(weights) * len(NF4_STORAGE) * 2  # FSDP pads each tensor to a multiple of 2 elements
        assert abs(local - total / 2) <= padding, (local, total)

        sharded_loss = model(input_ids=ids, labels=ids)["loss"]
        assert torch.allclose(sharded_loss, loss, rtol=1e-6)
        sharded_loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(full_tensor(p.grad), grads[n] / 2, atol=1e-6), n
        for i, layer in enumerate(lm.model.layers):
            layer.unshard()  # gathered as for a forward: the NF4 bytes must come back bit for bit
            for n, m in layer.named_modules():
                if isinstance(m, NF4Linear):
                    assert torch.equal(m.dequantized_weight(), weights[f"model.layers.{i}.{n}"]), n
            layer.reshard()

        # Optimizer state and adapters: gathered whole, then sliced again.
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        optimizer.step()
        full = full_optimizer_state(optimizer)
        reloaded = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        reloaded.load_state_dict(shard_optimizer_state(full, reloaded))
        for p in optimizer.param_groups[0]["params"]:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(reloaded.state[p][key].to_local(), optimizer.state[p][key].to_local())
        adapter = lora_state_dict(lm)
        save_adapter(lm, adapter_dir, peft_config(lm, 4, 8, 0.0, False, model_dir), write=rank == 0)
        dist.barrier()
        with torch.no_grad():
            for m in lora_modules(lm).values():
                m.lora_A.weight.zero_()
        load_adapter_weights(lm, adapter_dir)
        for key, value in lora_state_dict(lm).items():
            assert torch.equal(value, adapter[key]), key
        # Both done before either tears gloo down: a process whose peer has closed its connections
        # mid-teardown can abort ("terminate called without an active exception", seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_nf4_weights_are_sharded_and_gathered_bit_exact(tmp_path, tiny_model_dir, free_port):
    torch.multiprocessing.spawn(
        _sharding_worker, args=(free_port, str(tiny_model_dir), str(tmp_path / "adapter")), nprocs=2
    )


@pytest.mark.slow
def test_fsdp_training_equals_one_process(
    tmp_path, tiny_model_dir, identical_rows_task, make_recipe, accelerate_launch
):
    steps = ["training.max_steps=4", "training.batch_size=4", "training.save_steps=2"]
    single = make_recipe(
        tmp_path / "single", tiny_model_dir, identical_rows_task, *steps, "training.gradient_accumulation_steps=2"
    )
    train(single)

    make_recipe(tmp_path / "fsdp", tiny_model_dir, identical_rows_task, *steps)  # writes tmp_path/fsdp/recipe.yaml
    result = accelerate_launch("fsdp-cpu.yaml", tmp_path / "fsdp" / "recipe.yaml", *steps)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP over 2 processes: this one holds 50.0% of the" in result.stderr

    # The same losses and gradient norms step by step: the reduce-scattered gradient is the accumulated one.
    single_out, fsdp_out = Path(single.output.dir), tmp_path / "fsdp" / "out"
    logs = [
        json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        for out in (single_out, fsdp_out)
    ]
    steps_a, steps_b = ([(e["loss"], e["grad_norm"]) for e in log if "grad_norm" in e] for log in logs)
    assert len(steps_a) == 4 and torch.allclose(torch.tensor(steps_a), torch.tensor(steps_b), rtol=1e-5)
    metrics = [json.loads((out / "metrics.json").read_text()) for out in (single_out, fsdp_out)]
    assert metrics[0]["before"] == pytest.approx(metrics[1]["before"], rel=1e-5)

    # The same files as one process writes (one RNG state per process aside), with the same tensors.
    for directory in (single_out / "checkpoint-4", fsdp_out / "checkpoint-4", single_out, fsdp_out):
        assert (directory / ADAPTER_WEIGHTS).is_file()
    files = [
        {f.name for f in (out / "checkpoint-4").iterdir() if not f.name.startswith("rng_state")}
        for out in (single_out, fsdp_out)
    ]
    assert files[0] == files[1]
    # Adam divides by sqrt(v), which magnifies float-rounding differences of near-zero gradients.
    a, b = load_file(str(single_out / ADAPTER_WEIGHTS)), load_file(str(fsdp_out / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and torch.allclose(a[key], b[key], atol=1e-4), key
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in b.items() if "lora_B" in k)  # it trained
    opt_a, opt_b = (
        torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True) for out in (single_out, fsdp_out)
    )
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["param_groups"] == opt_b["param_groups"]
    for i, state in opt_a["state"].items():
        assert torch.allclose(state["exp_avg"], opt_b["state"][i]["exp_avg"], atol=1e-5)

    # One process resumes from the FSDP run's checkpoint and ends where it would have on its own.
    shutil.copytree(fsdp_out / "checkpoint-2", tmp_path / "resumed" / "out" / "checkpoint-2")
    resumed = make_recipe(
        tmp_path / "resumed",
        tiny_model_dir,
        identical_rows_task,
        *steps,
        "training.gradient_accumulation_steps=2",
        "training.resume=true",
        "data.test=null",
    )
    train(resumed)
    c = load_file(str(Path(resumed.output.dir) / ADAPTER_WEIGHTS))
    for key in a:
        assert torch.allclose(a[key], c[key], atol=1e-4), key
