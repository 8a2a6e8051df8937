"""``qlora-kit chat PATH``: talk to a trained or exported model through its own chat template.

What PATH is comes from its files:

    a directory with adapter_config.json   the NF4 base (named by the adapter's recipe.yaml or
                                           adapter_config.json) with the LoRA adapter, as training evaluated it
    a directory with config.json           a merged checkpoint, through transformers; with a
                                           quantization_config of GPTQ or AWQ, through transformers + gptqmodel
    a .gguf file (or a directory holding   llama.cpp, through llama-cpp-python (the file's own chat template)
    exactly one, as merge --quantize gguf writes it)

Answers are streamed as they are generated and end at the model's end-of-turn token (or
after ``max_new_tokens``); ``temperature`` 0 is greedy decoding.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch

from qlora_kit.errors import UserInputError

ADAPTER_CONFIG = "adapter_config.json"
CONFIG = "config.json"
LLAMA_CPP_CONTEXT = 4096  # tokens of conversation llama.cpp keeps (its KV cache)
# transformers loads these quantized checkpoints through gptqmodel (GPTQ also through optimum).
_QUANTIZED_NEEDS = {"gptq": ("gptqmodel", "optimum"), "awq": ("gptqmodel",)}


class ChatError(UserInputError):
    """A PATH that cannot be chatted with, or a missing package; the message says which and what to do."""


@dataclass
class ChatOptions:
    """Everything ``qlora-kit chat`` takes."""

    path: str
    prompt: str | None = None  # answer this once and return; None: the interactive loop
    system: str | None = None
    max_new_tokens: int = 512
    temperature: float = 0.7
    device: str | None = None


Messages = list[dict[str, str]]


class ChatModel(Protocol):
    def reply(self, messages: Messages, max_new_tokens: int, temperature: float, on_text: Callable[[str], None]) -> str:
        """The assistant's answer to ``messages``, passed to ``on_text`` piece by piece as it is generated."""


# ---------------------------------------------------------------------------------------------
# What PATH is


def detect(path: str | Path) -> tuple[str, Path]:
    """(kind, what to load): kind is ``adapter``, ``merged``, ``gptq``, ``awq`` or ``gguf``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ChatError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ChatError(f"{path} is a file but not a .gguf; pass a .gguf file or a model directory")
        return "gguf", path
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter", path
    if (path / CONFIG).is_file():
        try:
            config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatError(f"{path / CONFIG} is not valid JSON: {e}") from e
        if not isinstance(config, dict):
            raise ChatError(f"{path / CONFIG} is not a JSON object")
        method = (config.get("quantization_config") or {}).get("quant_method")
        return (method if method in _QUANTIZED_NEEDS else "merged"), path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise ChatError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}); name one")
    raise ChatError(
        f"{path} is not a model: it holds no {ADAPTER_CONFIG} (an adapter), no {CONFIG} (a checkpoint) "
        "and no .gguf file"
    )


def load_chat_model(path: str | Path, device: str | None = None) -> tuple[str, ChatModel]:
    """Detect what ``path`` is and load it; returns (kind, model)."""
    kind, target = detect(path)
    if kind == "gguf":
        return kind, LlamaCppChat(target)
    from qlora_kit.model.load import default_device

    where = torch.device(device) if device else default_device()
    if kind == "adapter":
        return kind, TransformersChat(*_adapter_model(target, where))
    if kind in _QUANTIZED_NEEDS:
        missing = [name for name in _QUANTIZED_NEEDS[kind] if importlib.util.find_spec(name) is None]
        if missing:
            raise ChatError(
                f"{target} is a {kind.upper()} checkpoint, which transformers loads through "
                f"{' and '.join(_QUANTIZED_NEEDS[kind])}: pip install {' '.join(missing)}"
            )
    return kind, TransformersChat(*_checkpoint_model(target, where, kind != "merged"))


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _checkpoint_model(directory: Path, device: torch.device, quantized: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.model.load import resolve_compute_dtype

    # GPTQ/AWQ kernels take the checkpoint's dtype; a merged model computes as training did (fp32 on a CPU).
    dtype = "auto" if quantized else resolve_compute_dtype("auto", device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map=str(device))
    except Exception as e:  # transformers raises many types for a corrupt or unknown checkpoint
        raise ChatError(f"cannot load the checkpoint in {directory}: {_reason(e)}") from e
    return model.eval(), tokenizer


def _adapter_model(directory: Path, device: torch.device) -> tuple[Any, Any]:
    """The NF4 base with the adapter's LoRA layers, and the tokenizer training saved beside the adapter."""
    from transformers import AutoTokenizer

    from qlora_kit.model.adapters import ADAPTER_WEIGHTS, add_lora, read_adapter, set_lora_weights
    from qlora_kit.model.load import load_quantized
    from qlora_kit.model.sources import load_tokenizer, resolve_source

    adapter = read_adapter(directory)
    source = resolve_source(adapter.base, adapter.gguf_file)
    model = load_quantized(source, device=device, progress=False)
    cfg = adapter.config
    targets = sorted({p.rpartition(".")[2] for p in adapter.lora})
    add_lora(model, cfg["r"], cfg["lora_alpha"], 0.0, targets, cfg.get("use_rslora", False))
    set_lora_weights(model, adapter.lora, directory / ADAPTER_WEIGHTS)
    tokenizer = (
        AutoTokenizer.from_pretrained(directory)
        if (directory / "tokenizer_config.json").is_file()
        else load_tokenizer(source)
    )
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# The two runtimes


class TransformersChat:
    """A transformers model and its tokenizer: the chat template rendered as evaluation renders it."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        config = getattr(model, "generation_config", None) or model.config
        eos = config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.stop = sorted({*eos, tokenizer.eos_token_id} - {None})  # the template's end of turn is the EOS

    @torch.no_grad()
    def reply(self, messages: Messages, max_new_tokens: int, temperature: float, on_text: Callable[[str], None]) -> str:
        from transformers import GenerationConfig, TextStreamer

        tok = self.tokenizer
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        batch = tok(text, return_tensors="pt", add_special_tokens=False).to(next(self.model.parameters()).device)

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    on_text(text)

        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        generation = GenerationConfig(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else self.stop[0],
            **sampling,
        )
        out = self.model.generate(
            **batch,
            generation_config=generation,
            streamer=Streamer(tok, skip_prompt=True, skip_special_tokens=True),
        )
        return tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


class LlamaCppChat:
    """A GGUF file in llama.cpp: its chat completion applies the file's template and stops at its EOS."""

    def __init__(self, path: Path) -> None:
        from qlora_kit.model.sources import check_gguf_header

        check_gguf_header(path)
        if importlib.util.find_spec("llama_cpp") is None:
            raise ChatError(
                f"{path} is a GGUF file, which chat runs in llama.cpp: pip install llama-cpp-python "
                "(or pip install -e .[gguf])"
            )
        from llama_cpp import Llama

        try:
            self.llm = Llama(model_path=str(path), n_ctx=LLAMA_CPP_CONTEXT, verbose=False)
        except Exception as e:  # llama-cpp-python raises ValueError for a file llama.cpp cannot load
            raise ChatError(f"llama.cpp cannot load {path} (truncated or corrupt?): {_reason(e)}") from e

    def reply(self, messages: Messages, max_new_tokens: int, temperature: float, on_text: Callable[[str], None]) -> str:
        pieces = []
        for chunk in self.llm.create_chat_completion(
            messages, max_tokens=max_new_tokens, temperature=temperature, stream=True
        ):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                pieces.append(piece)
                on_text(piece)
        return "".join(pieces)


# ---------------------------------------------------------------------------------------------
# The command


def chat(options: ChatOptions, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """``--prompt``: print one answer. Else the interactive loop: each line a user turn, answered with
    the whole conversation so far; an empty line, end of input or Ctrl-C leaves."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if options.max_new_tokens <= 0:
        raise ChatError(f"--max-new-tokens must be positive, got {options.max_new_tokens}")
    if options.temperature < 0:
        raise ChatError(f"--temperature must be 0 (greedy) or positive, got {options.temperature}")
    kind, model = load_chat_model(options.path, options.device)
    messages: Messages = [{"role": "system", "content": options.system}] if options.system else []

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    def answer() -> None:
        text = model.reply(messages, options.max_new_tokens, options.temperature, write)
        write("\n")
        messages.append({"role": "assistant", "content": text})

    if options.prompt is not None:
        messages.append({"role": "user", "content": options.prompt})
        answer()
        return
    terminal = stdin is sys.stdin and stdin.isatty()
    if terminal:
        import readline  # noqa: F401  (line editing and recall of earlier lines in input())

    def read_line() -> str:
        if terminal:
            try:
                return input("> ")
            except EOFError:
                return ""
        write("> ")
        return stdin.readline().rstrip("\n")

    print(f"chatting with {options.path} ({kind}); an empty line or Ctrl-C leaves", file=sys.stderr)
    try:
        while True:
            line = read_line()
            if not line.strip():  # an empty line, or the end of the input
                break
            messages.append({"role": "user", "content": line})
            answer()
    except KeyboardInterrupt:
        write("\n")
