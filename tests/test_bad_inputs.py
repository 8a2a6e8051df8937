"""What users get wrong, at every entry point: exit status 2, one line ``qlora-kit: error: ...``,
no traceback, and a message that names the culprit (key, file, row).

Most cases run ``cli.main`` in-process (they fail before or while the tiny model loads, or
after a few steps of training it); a few run the real entry points (train.py, the
``qlora-kit`` console script, ``accelerate launch``) as subprocesses. Running out of GPU
memory and of disk space are simulated by raising, at the step or the write, the
exceptions torch and the writers raise.
"""

import errno
import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import errors
from qlora_kit.cli import main
from qlora_kit.config import load_recipe, save_recipe
from qlora_kit.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qlora_kit.model.sources import resolve_source
from qlora_kit.pipelines.train import last_complete_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "qlora-kit"
# What torch raises when a CUDA allocation fails (torch 2.x wording).
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
    "20.00 MiB is free. Including non-PyTorch memory, this process has 79.16 GiB memory in use."
)
# What torch.save's zip writer raises when the disk fills (measured on a full tmpfs): no errno, no words.
TORCH_SAVE_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def fails(capsys, *argv) -> str:
    """Run the CLI in-process; assert a user error (status 2, one line, no traceback); return the line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("qlora-kit: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def copy_model(tiny_model_dir: Path, to: Path) -> Path:
    shutil.copytree(tiny_model_dir, to)
    return to


@pytest.fixture
def recipe(tmp_path, tiny_model_dir, task_files, make_recipe) -> Path:
    """A recipe file training the tiny model on the trivial task; its output.dir is tmp_path/out."""
    make_recipe(tmp_path, tiny_model_dir, task_files)
    return tmp_path / "recipe.yaml"


# ------------------------------------------------------------------------------------------
# train: recipes, paths and data


def test_missing_recipe_file(capsys, tmp_path):
    line = fails(capsys, "train", tmp_path / "nope.yaml")
    assert f"cannot read recipe file {tmp_path / 'nope.yaml'}" in line


def test_missing_data_file_in_the_recipe_names_key_line_and_places(capsys, tmp_path, monkeypatch, tiny_model_dir):
    recipe = tmp_path / "recipes/r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(f"model: {{name_or_path: '{tiny_model_dir}'}}\ndata:\n  train: data/train.jsonl\n")
    monkeypatch.chdir(tmp_path)
    line = fails(capsys, "train", recipe)
    assert f"{recipe}:3: data.train 'data/train.jsonl' not found" in line
    assert f"{tmp_path}/data/train.jsonl and {tmp_path}/recipes/data/train.jsonl" in line
    assert not (tmp_path / "outputs").exists()  # checked before anything is written


@pytest.mark.parametrize("key", ["data.train", "data.validation", "data.test"])
def test_missing_data_file_on_the_command_line(capsys, recipe, tmp_path, monkeypatch, key):
    monkeypatch.chdir(tmp_path)
    line = fails(capsys, "train", recipe, f"{key}=typo.jsonl")
    assert f"command-line override `{key}=typo.jsonl`: {key} 'typo.jsonl' not found" in line


def rows(*messages_lists) -> str:
    return "".join(json.dumps({"messages": m}) + "\n" for m in messages_lists)


GOOD = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
NO_ANSWER = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "yo"}]


@pytest.mark.parametrize(
    "content, extra, expected",
    [
        ("", [], "the file is empty"),
        ("\n\n", [], "the file is empty"),
        (rows(GOOD, NO_ANSWER), [], "row 2: no assistant message"),
        (rows(NO_ANSWER, NO_ANSWER), ["data.on_bad_row=skip"], "no usable rows"),
        (rows(LONG, LONG), [], "no example has a response within max_seq_len=64"),
        ('{"messages": [}\n', [], "line 1: invalid JSON"),
        (json.dumps({"question": "q", "answer": "a"}) + "\n", [], "fit no known format"),
        (rows(GOOD), ["data.validation=null", "data.validation_split=0.5"], "data.validation_split=0.5"),
    ],
    ids=["empty", "blank", "bad-row", "all-skipped", "all-too-long", "bad-json", "unknown-columns", "split-of-one"],
)
def test_unusable_data_names_the_file(capsys, recipe, tmp_path, content, extra, expected):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    line = fails(capsys, "train", recipe, f"data.train={data}", *extra)
    assert str(data) in line and expected in line


def test_data_folder_without_data(capsys, recipe, tmp_path):
    (tmp_path / "empty").mkdir()
    line = fails(capsys, "train", recipe, f"data.train={tmp_path / 'empty'}")
    assert "cannot load dataset" in line and str(tmp_path / "empty") in line
    (tmp_path / "rows.jsonl").mkdir()
    line = fails(capsys, "train", recipe, f"data.validation={tmp_path / 'rows.jsonl'}")
    assert f"{tmp_path / 'rows.jsonl'} is a folder, not a .jsonl file" in line


# ------------------------------------------------------------------------------------------
# train: models


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))


MODEL_CASES = {
    "truncated-shard": (
        lambda m: _truncate(m / "model.safetensors"),
        "corrupt or truncated shard {m}/model.safetensors",
    ),
    "garbage-shard": (
        lambda m: (m / "model.safetensors").write_bytes(b"\x00\x01not safetensors" * 64),
        "corrupt or truncated shard {m}/model.safetensors",
    ),
    "no-shard": (lambda m: (m / "model.safetensors").unlink(), "no .safetensors files in {m}"),
    "bad-config-json": (lambda m: (m / "config.json").write_text("{not json"), "cannot read the model config of {m}"),
    "unknown-architecture": (lambda m: _edit_config(m, model_type="foobar"), "cannot read the model config of {m}"),
    "unsupported-architecture": (
        lambda m: _edit_config(m, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
        "model type 'gpt2' is not supported; supported: llama",
    ),
    "no-tokenizer": (
        lambda m: [(m / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")],
        "cannot load the tokenizer of {m}",
    ),
    "no-chat-template": (lambda m: (m / "chat_template.jinja").unlink(), "has no chat template"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_unusable_model_directory(capsys, recipe, tmp_path, tiny_model_dir, case):
    model = copy_model(tiny_model_dir, tmp_path / "model")
    damage, expected = MODEL_CASES[case]
    damage(model)
    line = fails(capsys, "train", recipe, f"model.name_or_path={model}", "data.test=null")
    assert expected.format(m=model) in line


def test_model_path_that_does_not_exist(capsys, recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = fails(capsys, "train", recipe, "model.name_or_path=./models/llama")
    assert "model.name_or_path './models/llama' not found" in line


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda f, real: f.write_text("this is not a GGUF file"), "is not a GGUF file: it starts with b'this'"),
        (lambda f, real: f.write_bytes(real.read_bytes()[:8192]), "cannot read the model config of {f}"),
        (lambda f, real: f.write_bytes(real.read_bytes()[:3_000_000]), "cannot read the model config of {f}"),
        (lambda f, real: f.write_bytes(b"GGUF\xffabc"), "GGUF version"),
    ],
    ids=["not-gguf", "truncated-metadata", "truncated-tensors", "bad-version"],
)
def test_unusable_gguf_file(capsys, recipe, tmp_path, damage, expected):
    gguf = tmp_path / "model.gguf"
    damage(gguf, resolve_source("smollm2").gguf_path)
    line = fails(capsys, "train", recipe, f"model.name_or_path={gguf}")
    assert str(gguf) in line and expected.format(f=gguf) in line


# ------------------------------------------------------------------------------------------
# train: the output directory and checkpoints


def test_output_dir_that_is_a_file_or_holds_other_things(capsys, recipe, tmp_path):
    (tmp_path / "a-file").write_text("x")
    line = fails(capsys, "train", recipe, f"output.dir={tmp_path / 'a-file'}")
    assert f"output.dir '{tmp_path / 'a-file'}' is a file" in line
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_text("x")
    line = fails(capsys, "train", recipe, f"output.dir={other}")
    assert "holds files that are not a qlora-kit run (e.g. cat.jpg)" in line and "output.overwrite=true" in line
    assert sorted(p.name for p in other.iterdir()) == ["cat.jpg"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, task_files):
    """A finished 4-step run with checkpoint-2 and checkpoint-4 (copy it before changing it)."""
    from qlora_kit.pipelines.train import train

    root = tmp_path_factory.mktemp("trained")
    recipe_file = root / "recipe.yaml"
    recipe_file.write_text(
        f"model: {{name_or_path: '{tiny_model_dir}'}}\n"
        f"data: {{train: '{task_files}/train.jsonl', validation: '{task_files}/valid.jsonl', max_seq_len: 64}}\n"
        "lora: {r: 8, alpha: 16}\n"
        "training: {max_steps: 4, save_steps: 2, batch_size: 8, learning_rate: 3.0e-3, logging_steps: 1}\n"
        f"output: {{dir: '{root / 'out'}', report_to: none}}\n"
    )
    train(load_recipe(recipe_file))
    return recipe_file, root / "out"


def _resumable_copy(trained_run, tmp_path) -> tuple[Path, Path]:
    recipe_file, out = trained_run
    shutil.copytree(out, tmp_path / "out")
    return recipe_file, tmp_path / "out"


def test_a_run_that_would_be_overwritten(capsys, trained_run, tmp_path):
    recipe_file, out = _resumable_copy(trained_run, tmp_path)
    line = fails(capsys, "train", recipe_file, f"output.dir={out}")
    assert f"output.dir '{out}' already holds a run" in line and "training.resume=true" in line


@pytest.mark.parametrize(
    "file, damage",
    [
        ("optimizer.pt", lambda p: _truncate(p)),
        ("scheduler.pt", lambda p: p.write_bytes(b"garbage")),
        ("rng_state.pth", lambda p: _truncate(p, 0.3)),
        (ADAPTER_WEIGHTS, lambda p: p.write_bytes(b"garbage" * 100)),
    ],
)
def test_resume_from_a_corrupt_checkpoint(capsys, trained_run, tmp_path, file, damage):
    recipe_file, out = _resumable_copy(trained_run, tmp_path)
    damage(out / "checkpoint-4" / file)
    line = fails(capsys, "train", recipe_file, f"output.dir={out}", "training.max_steps=6", "training.resume=true")
    assert str(out / "checkpoint-4") in line


def test_resume_with_another_rank_names_the_mismatch(capsys, trained_run, tmp_path):
    recipe_file, out = _resumable_copy(trained_run, tmp_path)
    line = fails(
        capsys, "train", recipe_file, f"output.dir={out}", "training.max_steps=6", "training.resume=true", "lora.r=4"
    )
    assert f"{out / 'checkpoint-4' / ADAPTER_WEIGHTS}" in line and "has shape" in line


# ------------------------------------------------------------------------------------------
# train: out of GPU memory, disk full, Ctrl-C, bugs


def _fail_after(monkeypatch, owner, name, calls_ok: int, error: BaseException, on_fail=lambda: None) -> None:
    """Make ``owner.name`` raise ``error`` (after ``on_fail()``) from its call number ``calls_ok + 1`` on."""
    real, calls = getattr(owner, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) > calls_ok:
            on_fail()
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


def _run_args(recipe, out):
    return ("train", recipe, f"output.dir={out}", "training.max_steps=4", "training.save_steps=2", "data.test=null")


def test_out_of_gpu_memory_in_training(capsys, recipe, tmp_path, monkeypatch):
    from transformers import Trainer

    out = tmp_path / "out"
    _fail_after(monkeypatch, Trainer, "training_step", 2, torch.OutOfMemoryError(CUDA_OOM))
    line = fails(capsys, *_run_args(recipe, out))
    assert (
        "out of GPU memory while training (tried to allocate 2.00 GiB; GPU 0 has 79.19 GiB, of which 20.00 MiB" in line
    )
    for lever in (
        "training.batch_size=4 (now 8) with training.gradient_accumulation_steps=2",
        "data.max_seq_len=32 (now 64)",
        "training.offload_activations=true",
        "training.offload_embeddings=true",
        "training.optimizer_in_backward=true",
    ):
        assert lever in line
    assert "training.uncheckpointed_layers" not in line  # already 0
    assert f"The checkpoints in {out} are intact: add training.resume=true to continue from checkpoint-2" in line
    assert last_complete_checkpoint(out).name == "checkpoint-2"

    monkeypatch.undo()  # the GPU has room again: the run continues from checkpoint-2
    assert main([str(a) for a in _run_args(recipe, out)] + ["training.resume=true"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 4


DISK_FULL = {
    "oserror": (
        "safetensors.torch",
        "save_file",
        lambda: OSError(errno.ENOSPC, "No space left on device", "model.safetensors"),
        1,
    ),
    "safetensors-text": (
        "safetensors.torch",
        "save_file",
        lambda: __import__("safetensors").SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
        1,
    ),
    # The three torch.save calls of checkpoint-2 succeed; the first of checkpoint-4 fails.
    "torch-save": ("torch", "save", lambda: RuntimeError(TORCH_SAVE_DISK_FULL), 3),
}


@pytest.mark.parametrize("case", list(DISK_FULL))
def test_disk_full_while_saving_a_checkpoint(capsys, recipe, tmp_path, monkeypatch, case):
    import importlib

    module, name, error, calls_ok = DISK_FULL[case]
    out = tmp_path / "out"
    usage = namedtuple("usage", "total used free")

    def disk_now_full():  # 1 MiB left: for torch.save's error the only sign
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))

    _fail_after(monkeypatch, importlib.import_module(module), name, calls_ok, error(), disk_now_full)
    line = fails(capsys, *_run_args(recipe, out))
    assert "no space left on the disk while training" in line
    assert f"writing {out / 'checkpoint-4'}" in line or "model.safetensors" in line
    assert "free some space" in line and "continue from checkpoint-2" in line
    assert last_complete_checkpoint(out).name == "checkpoint-2"
    assert load_file(str(out / "checkpoint-2" / ADAPTER_WEIGHTS))


def test_ctrl_c_and_bugs(capsys, recipe, monkeypatch):
    import qlora_kit.pipelines.train as train_module

    def interrupted(recipe):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main(["train", str(recipe)]) == 130
    assert capsys.readouterr().err.strip().endswith("qlora-kit: interrupted")

    def bug(recipe):
        return recipe.no_such_section

    monkeypatch.setattr(train_module, "train", bug)
    with pytest.raises(AttributeError, match="no_such_section"):  # a programming error keeps its traceback
        main(["train", str(recipe)])


# ------------------------------------------------------------------------------------------
# The line between user errors and bugs


def test_user_error_message_draws_the_line(tmp_path):
    message = errors.user_error_message
    assert message(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))) == (
        f"{tmp_path / 'x'}: Permission denied"
    )
    assert message(IsADirectoryError(errno.EISDIR, "Is a directory", str(tmp_path))) == f"{tmp_path}: Is a directory"
    assert message(FileNotFoundError(errno.ENOENT, "No such file or directory", errors.__file__)) is None  # ours: a bug
    assert message(FileNotFoundError("no filename")) is None
    assert message(OSError(errno.ENOSPC, "No space left on device")).startswith("no space left on the disk")
    assert message(torch.OutOfMemoryError(CUDA_OOM)).startswith("out of GPU memory (tried to allocate 2.00 GiB")
    assert message(MemoryError()).startswith("out of host memory")
    assert message(ValueError("a bug")) is None and message(KeyError("x")) is None


# ------------------------------------------------------------------------------------------
# merge


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir, task_files):
    """An adapter directory on the tiny model (random B, so the merge changes the weights)."""
    from qlora_kit.model.adapters import add_lora, lora_modules, peft_config, save_adapter
    from qlora_kit.model.load import load_quantized
    from qlora_kit.model.sources import load_tokenizer

    root = tmp_path_factory.mktemp("adapter")
    model = load_quantized(str(tiny_model_dir), device="cpu", compute_dtype="float32", progress=False)
    add_lora(model, r=4, alpha=8)
    torch.manual_seed(1)
    for m in lora_modules(model).values():
        m.lora_B.weight.data.normal_(0, 0.05)
    save_adapter(model, root, peft_config(model, 4, 8, 0.0, False, str(tiny_model_dir)))
    load_tokenizer(resolve_source(str(tiny_model_dir))).save_pretrained(root)
    (root / "source.yaml").write_text(
        f"model: {{name_or_path: '{tiny_model_dir}'}}\ndata: {{train: '{task_files}/train.jsonl'}}\n"
    )
    save_recipe(load_recipe(root / "source.yaml"), root / "recipe.yaml")
    return root


def merge_args(adapter_dir, out, *extra):
    return ("merge", adapter_dir, "--out", out, "--no-eval", *extra)


def test_merge_missing_or_corrupt_adapter(capsys, adapter, tmp_path):
    line = fails(capsys, *merge_args(tmp_path / "nowhere", tmp_path / "o"))
    assert f"adapter directory {tmp_path / 'nowhere'} does not exist" in line

    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapter, corrupt)
    (corrupt / ADAPTER_WEIGHTS).write_bytes(b"garbage" * 100)
    line = fails(capsys, *merge_args(corrupt, tmp_path / "o"))
    assert f"cannot read {corrupt / ADAPTER_WEIGHTS}" in line

    shutil.copy(adapter / ADAPTER_WEIGHTS, corrupt / ADAPTER_WEIGHTS)
    _truncate(corrupt / ADAPTER_WEIGHTS)
    line = fails(capsys, *merge_args(corrupt, tmp_path / "o"))
    assert f"cannot read {corrupt / ADAPTER_WEIGHTS}" in line

    (corrupt / ADAPTER_CONFIG).write_text("{")
    line = fails(capsys, *merge_args(corrupt, tmp_path / "o"))
    assert f"{corrupt / ADAPTER_CONFIG} is not valid JSON" in line
    assert not (tmp_path / "o").exists()


def test_merge_corrupt_base_and_small_calibration(capsys, adapter, tmp_path, tiny_model_dir):
    base = copy_model(tiny_model_dir, tmp_path / "base")
    _truncate(base / "model.safetensors")
    line = fails(capsys, *merge_args(adapter, tmp_path / "o", "--base", base))
    assert f"corrupt or truncated shard {base}/model.safetensors" in line

    text = tmp_path / "calib.txt"
    text.write_text("only a few words")
    line = fails(
        capsys,
        *merge_args(adapter, tmp_path / "o", "--quantize", "gptq", "--group-size", "32"),
        "--calibration",
        text,
        "--calibration-samples",
        "4",
        "--calibration-seq-len",
        "64",
    )
    assert f"calibration data {text} has" in line and "need 256" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "calib.txt"]


def test_merge_never_writes_over_an_output(capsys, adapter, tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    (held / "config.json").write_text("{}")
    line = fails(capsys, *merge_args(adapter, held))
    assert f"--out {held} already holds a model (config.json); pass --overwrite" in line
    assert [p.name for p in held.iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    "patch, error, expected",
    [
        (
            ("qlora_kit.pipelines.export", "CheckpointWriter._flush"),
            lambda: torch.OutOfMemoryError(CUDA_OOM),
            "out of GPU memory while merging (tried to allocate 2.00 GiB",
        ),
        (
            ("safetensors.torch", "save_file"),
            lambda: __import__("safetensors").SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            ),
            "no space left on the disk while merging, writing {out}",
        ),
    ],
    ids=["out-of-gpu-memory", "disk-full"],
)
def test_merge_out_of_memory_or_disk(capsys, adapter, tmp_path, monkeypatch, patch, error, expected):
    import importlib

    module, name = patch
    owner = importlib.import_module(module)
    if "." in name:
        cls, _, name = name.partition(".")
        owner = getattr(owner, cls)
    _fail_after(monkeypatch, owner, name, 0, error())
    out = tmp_path / "merged"
    line = fails(capsys, *merge_args(adapter, out))
    assert expected.format(out=out) in line and f"Nothing was written to {out}" in line
    assert list(tmp_path.iterdir()) == []  # no output, no partial directory


def test_merge_oom_names_the_levers(capsys, adapter, tmp_path, monkeypatch):
    from qlora_kit.pipelines.export import CheckpointWriter

    _fail_after(monkeypatch, CheckpointWriter, "_flush", 0, torch.OutOfMemoryError(CUDA_OOM))
    line = fails(
        capsys,
        *("merge", adapter, "--out", tmp_path / "m", "--quantize", "gptq", "--group-size", "32"),
        *("--calibration-samples", "2", "--calibration-seq-len", "16"),
        *("--eval-text", ROOT / "examples/heldout/essays.txt"),
    )
    for lever in ("--calibration-samples 1 (now 2)", "--calibration-seq-len 8 (now 16)", "--no-eval", "--device cpu"):
        assert lever in line


def test_interrupted_merge(capsys, adapter, tmp_path, monkeypatch):
    from qlora_kit.pipelines.export import CheckpointWriter

    _fail_after(monkeypatch, CheckpointWriter, "_flush", 0, KeyboardInterrupt())
    assert main([str(a) for a in merge_args(adapter, tmp_path / "m")]) == 130
    assert "qlora-kit: interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# The real entry points, as subprocesses


def _no_traceback_one_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("qlora-kit: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_train_py_from_another_directory(tmp_path, tiny_model_dir):
    """The shipped recipe resolves its data from any directory; the one bad path is named."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            str(ROOT / "recipes/quickstart.yaml"),
            f"model.name_or_path={tiny_model_dir}",
            "data.test=tests.jsonl",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    line = _no_traceback_one_error(result)
    assert f"data.test 'tests.jsonl' not found (looked for {tmp_path}/tests.jsonl)" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not CONSOLE_SCRIPT.is_file(), reason="the qlora-kit console script is not installed")
def test_console_script_train_and_merge(tmp_path, recipe):
    gguf = tmp_path / "model.gguf"
    gguf.write_text("not a model")
    train = subprocess.run(
        [str(CONSOLE_SCRIPT), "train", str(recipe), f"model.name_or_path={gguf}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 2
    assert f"{gguf} is not a GGUF file" in _no_traceback_one_error(train)

    merge = subprocess.run(
        [str(CONSOLE_SCRIPT), "merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert merge.returncode == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in _no_traceback_one_error(merge)


def test_accelerate_launch(tmp_path, recipe):
    """Our processes print the one line; accelerate's launcher then exits 1, and without --quiet
    adds a traceback of its own (of the launcher: no qlora_kit frame in it)."""

    def launch(*flags):
        return subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", *flags, "--cpu", "--num_processes", "1"]
            + [str(ROOT / "train.py"), str(recipe), "data.train=typo.jsonl"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    quiet = launch("--quiet")
    assert quiet.returncode == 1
    assert "data.train 'typo.jsonl' not found" in _no_traceback_one_error(quiet)
    loud = launch()
    assert loud.returncode == 1 and "qlora-kit: error: command-line override `data.train=typo.jsonl`" in loud.stderr
    assert "qlora_kit" not in loud.stderr.partition("Traceback")[2]
