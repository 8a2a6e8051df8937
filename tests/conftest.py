"""Session-wide test setup and shared fixtures."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in Triton's interpreter on the CPU. Triton reads
# TRITON_INTERPRET once (the first time anything imports and uses it, e.g. bitsandbytes),
# so it is set here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_llama_config():
    """A factory of two-layer Llama configs of hidden size 32 and vocabulary 64; keywords override or add fields."""
    from transformers import LlamaConfig

    def make(**overrides) -> LlamaConfig:
        fields = dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return LlamaConfig(**{**fields, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama with random weights and SmolLM2's tokenizer (chat template included)."""
    from qlora_kit.model.sources import load_tokenizer, resolve_source

    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), load_tokenizer(resolve_source("smollm2")))


@pytest.fixture(scope="session")
def word_model_dir(tmp_path_factory):
    """The same 2-layer Llama over a tokenizer made here (the task's words, a chat template): no embedded
    model needed, for machines without it (the GPU box)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", "user", "assistant", "Question", ":", ".", "say", "the", "word", "banana"]
    vocab = {w: i for i, w in enumerate(words + [str(i) for i in range(64)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=template,
    )
    return _save_tiny_llama(tmp_path_factory.mktemp("word-llama"), fast)


def _save_tiny_llama(path: Path, tokenizer) -> Path:
    """A 2-layer Llama with random weights (seed 0) over ``tokenizer``'s vocabulary, saved with it in ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def task_files(tmp_path_factory):
    """A trivially learnable chat task: answer every question with the same word."""
    path = tmp_path_factory.mktemp("task")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}: say the word."},
                {"role": "assistant", "content": "banana"},
            ]
        }
        for i in range(64)
    ]
    for name, part in (("train", rows[:48]), ("valid", rows[48:56]), ("test", rows[56:])):
        (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return path


@pytest.fixture(scope="session")
def identical_rows_task(tmp_path_factory):
    """Train/valid/test files of one repeated row. The samplers of 1 and 2 processes shuffle
    differently; identical rows make every order give the same batches, so a multi-process
    run can be compared almost exactly with one process."""
    path = tmp_path_factory.mktemp("identical-rows")
    row = json.dumps(
        {"messages": [{"role": "user", "content": "Say the word."}, {"role": "assistant", "content": "banana"}]}
    )
    for name, n in (("train", 48), ("valid", 8), ("test", 4)):
        (path / f"{name}.jsonl").write_text((row + "\n") * n)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port on localhost nothing listens on (for a process group's rendezvous)."""
    return _free_port()


@pytest.fixture
def accelerate_launch():
    """accelerate_launch(config, recipe_file, *overrides): train.py in the processes of
    recipes/accelerate/<config>, run from the recipe's folder; returns the CompletedProcess."""
    root = Path(__file__).resolve().parent.parent

    def launch(config: str, recipe_file: Path, *overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(root / "recipes/accelerate" / config),
                "--main_process_port",
                str(_free_port()),
                str(root / "train.py"),
                str(recipe_file),
                *overrides,
            ],
            cwd=recipe_file.parent,
            capture_output=True,
            text=True,
            timeout=600,
        )

    return launch


@pytest.fixture
def quickstart_losses():
    """quickstart_losses(out_dir, steps, *overrides): train recipes/quickstart.yaml (plus ``overrides``) for
    ``steps`` steps, logging every step, without evaluation; returns the training loss of each step."""
    return _quickstart_losses


def _quickstart_losses(out_dir: Path, steps: int, *overrides: str) -> list[float]:
    from qlora_kit.config import load_recipe
    from qlora_kit.pipelines.train import train

    root = Path(__file__).resolve().parent.parent
    recipe = load_recipe(
        root / "recipes" / "quickstart.yaml",
        [
            f"training.max_steps={steps}",
            "training.logging_steps=1",
            f"training.save_steps={steps}",
            "training.eval_steps=null",
            "data.validation=null",
            "data.test=null",
            "output.report_to=none",
            f"output.dir={out_dir}",
            *overrides,
        ],
    )
    train(recipe)
    state = json.loads((out_dir / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture
def make_recipe():
    """make_recipe(dir, model_dir, task_dir, *overrides): a recipe training the tiny model on the trivial task."""
    return _tiny_recipe


@pytest.fixture
def built_model():
    """built_model(dir, model_dir, task_dir, *overrides): make_recipe's recipe built by the model builder on
    the CPU (``build_training_model``, what train() runs), in training mode."""
    return _built_model


def _built_model(tmp_path, model_dir, task, *overrides):
    from qlora_kit.model.sources import resolve_source
    from qlora_kit.pipelines.builder import build_training_model

    recipe = _tiny_recipe(tmp_path, model_dir, task, *overrides)
    built = build_training_model(recipe, "cpu", source=resolve_source(str(model_dir)), progress=False)
    built.model.train()
    return built


def _tiny_recipe(tmp_path, model_dir, task, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        f"model: {{name_or_path: '{model_dir}'}}\n"
        f"data: {{train: '{task}/train.jsonl', validation: '{task}/valid.jsonl', test: '{task}/test.jsonl', max_seq_len: 64}}\n"
        "lora: {r: 8, alpha: 16}\n"
        "training: {max_steps: 30, batch_size: 8, learning_rate: 3.0e-3, warmup_ratio: 0.0, logging_steps: 1, "
        "save_steps: 10, gradient_checkpointing: true, lr_scheduler: constant}\n"
        "eval: {max_new_tokens: 4}\n"
        f"output: {{dir: '{tmp_path / 'out'}', report_to: tensorboard}}\n"
    )
    from qlora_kit.config import load_recipe

    return load_recipe(recipe_file, list(overrides))
