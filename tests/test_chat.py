"""qlora-kit chat: answers against plain transformers generate (and PEFT for an adapter), the
interactive loop driven through stdin, and one-line errors for paths that are not models."""

import importlib.util
import io
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import qlora_kit.pipelines.chat as chat_module
from qlora_kit.cli import main
from qlora_kit.model.adapters import add_lora, lora_modules, peft_config, save_adapter
from qlora_kit.model.load import load_quantized
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.quant.nf4 import dequantize_nf4_reference

GREEDY = ["--temperature", "0", "--max-new-tokens", "8"]


def generate(model, tokenizer, messages, max_new_tokens=8):
    """Plain transformers greedy generation of the assistant's next turn."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """An adapter on the tiny model with random LoRA weights (B non-zero, so it changes the answers)."""
    model = load_quantized(str(tiny_model_dir), device="cpu", compute_dtype="float32", progress=False)
    add_lora(model, r=4, alpha=8)
    torch.manual_seed(3)
    for m in lora_modules(model).values():
        m.lora_B.weight.data.normal_(0, 0.5)
    directory = tmp_path_factory.mktemp("chat-adapter")
    save_adapter(model, directory, peft_config(model, 4, 8, 0.0, False, str(tiny_model_dir)))
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


def chat(capsys, *args):
    code = main(["chat", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prompt_answer_equals_transformers_generate(tiny_model_dir, reference, capsys):
    model, tokenizer = reference
    code, out, _ = chat(capsys, tiny_model_dir, "--prompt", "What is the date?", *GREEDY)
    expected = generate(model, tokenizer, [{"role": "user", "content": "What is the date?"}])
    assert code == 0 and expected and out == expected + "\n"

    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    code, out, _ = chat(capsys, tiny_model_dir, "--system", "Answer in French.", "--prompt", "Hi", *GREEDY)
    assert code == 0 and out == generate(model, tokenizer, messages) + "\n"


def test_adapter_answer_equals_peft_on_the_nf4_weights(tiny_model_dir, adapter_dir, reference, capsys):
    """The adapter's answer is PEFT's adapter on a stock model holding the NF4 weights training saw."""
    from peft import PeftModel

    _, tokenizer = reference
    stock = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    quantized = load_quantized(str(tiny_model_dir), device="cpu", compute_dtype="float32", progress=False)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, NF4Linear):
                stock.get_submodule(name).weight.copy_(dequantize_nf4_reference(m.nf4_weight, torch.float32))
    messages = [{"role": "user", "content": "Convert the 5th of March, 2021."}]
    without = generate(stock.eval(), tokenizer, messages)
    expected = generate(PeftModel.from_pretrained(stock, adapter_dir).eval(), tokenizer, messages)
    assert expected != without  # the adapter matters: the check can fail
    code, out, _ = chat(capsys, adapter_dir, "--prompt", messages[0]["content"], *GREEDY)
    assert code == 0 and out == expected + "\n"


def test_interactive_loop_keeps_the_history_and_leaves_on_an_empty_line(tiny_model_dir, reference, capsys, monkeypatch):
    model, tokenizer = reference
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd then?\n\nnever read\n"))
    code, out, err = chat(capsys, tiny_model_dir, *GREEDY)
    history = [{"role": "user", "content": "Hello there"}]
    first = generate(model, tokenizer, history)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = generate(model, tokenizer, history)
    assert code == 0 and out == f"> {first}\n> {second}\n> "
    assert "an empty line or Ctrl-C leaves" in err


def test_interactive_loop_leaves_at_the_end_of_input(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    code, out, _ = chat(capsys, tiny_model_dir, *GREEDY)
    assert code == 0 and out.count("> ") == 2


def one_line_error(capsys, *args):
    code, _, err = chat(capsys, *args)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_paths_that_are_not_models_get_one_line(tmp_path, capsys):
    assert f"{tmp_path / 'nowhere'} does not exist" in one_line_error(capsys, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is not a model: it holds no adapter_config.json" in one_line_error(capsys, empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama",')
    assert "config.json is not valid JSON" in one_line_error(capsys, broken)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "no-such-model"}')
    assert f"cannot load the checkpoint in {unknown}" in one_line_error(capsys, unknown)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "is a file but not a .gguf" in one_line_error(capsys, text)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    assert "is not a GGUF file" in one_line_error(capsys, fake)
    assert "--temperature must be 0 (greedy) or positive" in one_line_error(capsys, empty, "--temperature", "-1")


def test_missing_packages_are_named(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec

    def without(*names):
        monkeypatch.setattr(chat_module.importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))

    for method, packages in (("gptq", "gptqmodel optimum"), ("awq", "gptqmodel")):
        directory = tmp_path / method
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": method}}))
        without("gptqmodel", "optimum")
        assert f"is a {method.upper()} checkpoint" in (err := one_line_error(capsys, directory))
        assert f"pip install {packages}" in err

    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(32))
    without("llama_cpp")
    assert "pip install llama-cpp-python" in one_line_error(capsys, gguf_file)
    # a directory holding one .gguf file (as merge --quantize gguf writes it) is that file
    shutil.copy(gguf_file, tmp_path / "gguf-dir.gguf")
    (tmp_path / "gguf-dir").mkdir()
    shutil.move(tmp_path / "gguf-dir.gguf", tmp_path / "gguf-dir" / "m.gguf")
    assert "m.gguf is a GGUF file" in one_line_error(capsys, tmp_path / "gguf-dir")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_truncated_gguf_is_refused_by_llama_cpp(tmp_path, capsys):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(32))
    assert "llama.cpp cannot load" in one_line_error(capsys, gguf_file)
