"""Long context: what the model never materialises, and the search of scripts/bench_context.py.

- attention: with sdpa and no padding, torch's sdpa gets no [seq x seq] mask and is_causal=True,
  so CUDA can run its flash / memory-efficient kernels (memory linear in the sequence);
- the frozen input embedding gets no [vocab x hidden] gradient;
- with training.recompute_attention=false the recompute takes the forward's attention output
  (flash backward from kept O and logsumexp): the same gradients, attention run once fewer;
- the longest-fit search finds the longest multiple of the step that fits, whatever the start.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent


def bench_context():
    spec = importlib.util.spec_from_file_location("bench_context", REPO / "scripts" / "bench_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mask", [None, "ones"])
def test_sdpa_gets_no_mask_for_an_unpadded_batch(tmp_path, tiny_model_dir, task_files, built_model, monkeypatch, mask):
    """What the data collator passes for unpacked rows (a mask of ones) builds no 4D mask either."""
    built = built_model(tmp_path, tiny_model_dir, task_files)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((attn_mask, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 1000, (1, 40))
    kwargs = {"attention_mask": torch.ones_like(ids)} if mask == "ones" else {}
    built.model(input_ids=ids, labels=ids, **kwargs)["loss"].backward()
    assert len(calls) == 2 * 2  # 2 layers, forward and the checkpoint's recomputation
    assert all(attn_mask is None and is_causal for attn_mask, is_causal in calls)


def _causal_attention_float64(q, k, v, scale):
    """softmax(q k^T * scale + causal mask) v, kv heads repeated for their query heads: [b, s, h, d]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    seq = q.shape[2]
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads,seq", [(4, 4, 33), (4, 2, 64), (6, 1, 17)])
def test_attention_from_kept_output_matches_float64(heads, kv_heads, seq):
    from qlora_kit.modules.flash_attention import AttentionFromKept, flash_forward

    gen = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(2, h, seq, 16, generator=gen) for h in (heads, kv_heads, kv_heads))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        out, lse, state = flash_forward(q, k, v, 0.3)
    y = AttentionFromKept.apply(q, k, v, out, lse, state, 0.3)
    grad = torch.randn(y.shape, generator=gen)
    y.backward(grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _causal_attention_float64(q64, k64, v64, 0.3)
    ref.backward(grad.double())
    assert y.shape == (2, seq, heads, 16)
    torch.testing.assert_close(y.double(), ref, atol=2e-6, rtol=1e-5)
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_kept_attention_gives_the_same_gradients_without_recomputing_it(
    tmp_path, tiny_model_dir, task_files, built_model, monkeypatch, padded
):
    """recompute_attention=false: the loss and LoRA gradients of the recomputing checkpoint, and no
    attention in the recompute; a padded batch (a mask: not the flash kernel's) recomputes as before."""
    from qlora_kit.model import offload

    calls = {"sdpa": 0, "flash": 0}
    sdpa, flash = torch.nn.functional.scaled_dot_product_attention, offload.flash_forward

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted("sdpa", sdpa))
    monkeypatch.setattr(offload, "flash_forward", counted("flash", flash))
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 30:] = 0
    results = {}
    for recompute in ("true", "false"):
        built = built_model(
            tmp_path / recompute,
            tiny_model_dir,
            task_files,
            "training.offload_activations=true",
            f"training.recompute_attention={recompute}",
        )
        calls.update(sdpa=0, flash=0)
        loss = built.model(input_ids=ids, labels=ids, attention_mask=mask)["loss"]
        loss.backward()
        results[recompute] = (
            dict(calls),
            loss.detach(),
            {n: p.grad for n, p in built.lm.named_parameters() if p.grad is not None},
        )
    (calls_r, loss_r, grads_r), (calls_k, loss_k, grads_k) = results["true"], results["false"]
    assert calls_r == {"sdpa": 2 * 2, "flash": 0}  # 2 layers: forward and recompute
    assert calls_k == ({"sdpa": 2 * 2, "flash": 0} if padded else {"sdpa": 0, "flash": 2})  # forward only
    torch.testing.assert_close(loss_k, loss_r, atol=0, rtol=0)
    assert grads_r.keys() == grads_k.keys() and len(grads_r) == 2 * 7 * 2
    for name in grads_r:
        torch.testing.assert_close(grads_k[name], grads_r[name], atol=1e-6, rtol=1e-5, msg=name)


def test_recompute_attention_recipe_errors(tmp_path, tiny_model_dir, task_files, make_recipe):
    from qlora_kit.config import RecipeError

    with pytest.raises(RecipeError, match="training.recompute_attention.*offload_activations=true"):
        make_recipe(tmp_path / "a", tiny_model_dir, task_files, "training.recompute_attention=false")
    keep = ["training.offload_activations=true", "training.recompute_attention=false"]
    with pytest.raises(RecipeError, match="fp8_base_matmul=backward"):
        make_recipe(tmp_path / "b", tiny_model_dir, task_files, *keep, "training.fp8_base_matmul=backward")
    with pytest.raises(RecipeError, match="training.recompute_attention: .*sdpa attention, not 'eager'"):
        make_recipe(tmp_path / "c", tiny_model_dir, task_files, *keep, "model.attn_implementation=eager")


class _Ops(TorchDispatchMode):
    """The aten ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("levers", [[], ["training.offload_activations=true"], ["training.fused_kernels=false"]])
def test_no_gradient_for_the_frozen_embedding(tmp_path, tiny_model_dir, task_files, built_model, levers):
    built = built_model(tmp_path, tiny_model_dir, task_files, *levers)
    embedding = built.lm.get_input_embeddings().weight
    ids = torch.randint(0, 1000, (1, 40))
    loss = built.model(input_ids=ids, labels=ids)["loss"]
    ops = _Ops()
    with ops:
        loss.backward()
    assert "mm.default" in ops.names  # the spy sees the backward's ops
    assert not any("embedding" in name for name in ops.names)
    assert not embedding.requires_grad and embedding.grad is None
    assert all(p.grad is not None for p in built.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("limit", [0, 5, 8192, 8193, 24575, 57344, 65536, 100000, 10**7])
@pytest.mark.parametrize("start", [8192, 65536, 139264])
def test_longest_fit_search(limit, start):
    search = bench_context()
    tried = []

    def fits(seq):
        assert seq % 8192 == 0 and 8192 <= seq <= 262144
        tried.append(seq)
        return seq <= limit

    assert search.longest_fit(fits, 8192, start, 262144) == min(limit // 8192 * 8192, 262144)
    assert len(tried) == len(set(tried)) <= 12  # doubling and bisecting, no length twice


def test_per_side_start_and_max_lengths():
    per_side = bench_context().per_side
    sides = ["ours-long", "stock", "unsloth"]
    assert per_side("65536", sides, 8192, "--start") == dict.fromkeys(sides, 65536)
    assert per_side("stock=8192,unsloth=65536", sides, 4096, "--start") == {
        "ours-long": 4096,
        "stock": 8192,
        "unsloth": 65536,
    }
    assert per_side("stock=8192,131072", sides, 4096, "--start")["ours-long"] == 131072
    for bad, message in [("liger=8192", "'liger' is not one of the sides"), ("stock=8k", "'8k' is not a number")]:
        with pytest.raises(ValueError, match=message):
            per_side(bad, sides, 8192, "--start")


def test_bench_attention_on_the_cpu_agrees_with_float64():
    """scripts/bench_attention.py's smoke run: every method's gradients against its float64 reference."""
    command = [sys.executable, str(REPO / "scripts/bench_attention.py"), "--device", "cpu", "--seq", "256"]
    command += ["--check-seq", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--reps", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split(maxsplit=3) for line in done.stdout.splitlines() if line.startswith(("  sdpa", "  kept"))]
    assert [" ".join(r[:3]) for r in rows] == ["sdpa, 3 passes", "kept on flash", "kept on cudnn"]
    for row in rows:
        assert all(float(e) < 1e-2 for e in row[3].split(", ")), row  # bf16 inputs: rounding only
    assert "256  flash_attention         yes" in done.stdout


def test_a_trial_killed_by_the_host_says_so(monkeypatch):
    """The kernel's OOM killer ends a trial with SIGKILL and no message: the error names the likely cause."""
    import argparse
    import signal

    search = bench_context()
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    killed = subprocess.CompletedProcess([], -signal.SIGKILL, stdout="", stderr="")
    monkeypatch.setattr(search.subprocess, "run", lambda *a, **k: killed)
    args = argparse.Namespace(trial_timeout=5, pythonpath=[])
    monkeypatch.setattr(search, "_forwarded", lambda args: [])
    result = search.trial_in_subprocess("ours-long", 344064, args)
    assert not result["fits"]
    assert result["error"] == f"{search.CRASHED} -9: killed (SIGKILL): most likely the host ran out of CPU memory"


@pytest.mark.slow
def test_dry_run_of_the_search(tmp_path):
    """The CPU dry run: trials in subprocesses, a simulated cap of 352 tokens, step 64."""
    out = tmp_path / "trials.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/bench_context.py"), "--dry-run", "--side", "ours,stock", "--json", out],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith(("ours ", "stock "))}
    assert rows["ours"][1] == "320" and rows["stock"][1] == "skipped:"

    trials = json.loads(out.read_text())["trials"]["ours"]
    assert sorted(map(int, trials)) == [64, 128, 256, 320, 384, 512]
    assert all(t["fits"] == (int(seq) <= 320) for seq, t in trials.items())
    assert all(len(t["losses"]) == 3 for t in trials.values() if t["fits"])  # 3 optimizer steps

    # --resume: the trials measured are reused, one that crashed (here: said to have) runs again.
    results = json.loads(out.read_text())
    results["trials"]["ours"]["320"] = {"fits": False, "error": "the trial exited with status 1: ImportError"}
    results["trials"]["ours"]["64"]["tokens_per_s"] = -1.0  # a marker: reused, not measured again
    out.write_text(json.dumps(results))
    command = [sys.executable, str(REPO / "scripts/bench_context.py"), "--dry-run", "--side", "ours", "--json", out]
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert [line.split()[:2] for line in done.stdout.splitlines() if line.startswith("ours seq")] == [["ours", "seq"]]
    trials = json.loads(out.read_text())["trials"]["ours"]
    assert trials["320"]["fits"] and trials["64"]["tokens_per_s"] == -1.0
