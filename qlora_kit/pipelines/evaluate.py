"""Evaluation used at every stage: perplexity on held-out text, response loss, logit agreement, exact-match accuracy.

Its length: every stage's evaluation (training's report and the merge report) is this one module,
so that both measure the same way.

The exact-match part serves training's before/after report and the merge report alike: greedy
answers within a generation budget sized from the data, a count of the answers that the budget cut,
the matching rule of ``eval.match``, and every generation, to be shown and written out.

The report of ``qlora-kit merge`` (:class:`Evaluation`, :func:`format_report`) measures every model
it builds in a stock transformers model holding exactly what its checkpoint holds.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlora_kit.pipelines.layerwise import skeleton_model
from qlora_kit.pipelines.matching import answers_match, check_references
from qlora_kit.quant.intq import IntQuantWeight

if TYPE_CHECKING:
    from qlora_kit.config import Recipe

log = logging.getLogger("qlora_kit")


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int = 512, progress: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len`` tokens.

    Every token after the first of each window is predicted once; a short last
    window is kept so no text is dropped.
    """
    device = next(model.parameters()).device
    ids = token_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    total_nll, total_tokens = 0.0, 0
    starts = range(0, ids.numel() - 1, seq_len)
    for start in tqdm(starts, desc="perplexity", disable=not progress):
        window = ids[start : start + seq_len].to(device)
        if window.numel() < 2:
            break
        logits = model(window[None]).logits[0, :-1].float()
        total_nll += nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        total_tokens += window.numel() - 1
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def response_loss(model: nn.Module, batches: Iterable[dict]) -> float:
    """Mean next-token cross-entropy over the labelled tokens (label != -100) of padded batches.

    ``batches``: what the data module's ``DataCollator`` makes of a tokenized validation
    split (``input_ids``, ``labels``, the attention mask and the positions the training loss reads):
    the loss training reports as validation loss.
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "labelled_positions")}
        logits = model(**inputs).logits[:, :-1].float()
        targets = batch["labels"][:, 1:].to(device)
        total_nll += nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum").item()
        total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        raise ValueError("response_loss: no labelled tokens in the batches")
    return total_nll / total_tokens


@torch.no_grad()
def logit_agreement(model_a: nn.Module, model_b: nn.Module, token_ids: torch.Tensor, seq_len: int = 512) -> dict:
    """How closely model_a's next-token distributions follow model_b's on the same text.

    Returns the relative L2 error of the logits, the top-1 agreement and the mean
    KL(b || a) in nats per token.
    """
    ids = token_ids.reshape(-1)[:seq_len][None]
    a = model_a(ids.to(next(model_a.parameters()).device)).logits[0].float().cpu()
    b = model_b(ids.to(next(model_b.parameters()).device)).logits[0].float().cpu()
    kl = nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="batchmean")
    return {
        "relative_l2": ((a - b).norm() / b.norm()).item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "kl_nats_per_token": kl.item(),
    }


@dataclass
class Generation:
    """One greedy completion of a test prompt."""

    text: str
    cut: bool  # it reached max_new_tokens without an end-of-turn token


def _stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """The end-of-turn token that training puts after every response (the tokenizer's EOS) and
    the model's own stop tokens."""
    config = getattr(model, "generation_config", None) or model.config
    ids = config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({*ids, tokenizer.eos_token_id} - {None})


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = False,
) -> list[Generation]:
    """Greedy completions of chat prompts (the template's generation prompt appended)."""
    device = next(model.parameters()).device
    stop = _stop_ids(model, tokenizer)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    answers: list[Generation] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
            texts = [
                tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                for p in prompts[start : start + batch_size]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            # A row that stopped holds a stop token; one that did not ran to max_new_tokens.
            stopped = torch.isin(new, torch.tensor(stop, device=new.device)).any(dim=1).tolist()
            decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
            answers += [Generation(text, not done) for text, done in zip(decoded, stopped)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def generation_budget(tokenizer, examples: list[dict], max_new_tokens: int | None = None) -> int:
    """New tokens to generate per test answer: ``max_new_tokens`` when set, else (logged) the
    longest reference answer in tokens plus its end-of-turn token and a margin of a quarter, at
    least 8 tokens, for a model that words it a little differently.

    A set budget with no room for the longest answer and its end-of-turn token is warned about.
    """
    longest = max(map(len, tokenizer([e["answer"] for e in examples], add_special_tokens=False)["input_ids"]))
    if max_new_tokens is None:
        budget = longest + 1 + max(8, longest // 4)
        log.info(
            "eval.max_new_tokens not set: generating up to %d tokens per test answer (the longest reference "
            "answer is %d tokens)",
            budget,
            longest,
        )
        return budget
    if max_new_tokens <= longest:
        log.warning(
            "eval.max_new_tokens=%d leaves no room for the longest reference test answer (%d tokens) and its "
            "end-of-turn token: such answers will be cut (leave eval.max_new_tokens unset to size it from the data)",
            max_new_tokens,
            longest,
        )
    return max_new_tokens


def cut_note(cut: int, total: int, max_new_tokens: int) -> str:
    """What the report says next to a score when answers were cut ('' when none were)."""
    if not cut:
        return ""
    return f"{cut} of {total} answers were cut at {max_new_tokens} tokens: raise eval.max_new_tokens"


def _shown(text: str, limit: int = 200) -> str:
    """A string as JSON (quotes and escapes make whitespace visible), shortened to ``limit`` characters."""
    return json.dumps(text if len(text) <= limit else text[:limit] + "…", ensure_ascii=False)


@dataclass
class ExactMatchResult:
    """The test-split score and what it was made of.

    ``generations``: one dict per example, in order: ``prompt`` (the chat messages), ``expected``,
    ``generated``, ``correct``, ``cut`` (reached ``max_new_tokens`` without the end-of-turn token)
    and ``problem`` (why ``match`` could not read the answer, else None).
    """

    match: str
    max_new_tokens: int
    generations: list[dict]

    @property
    def correct(self) -> int:
        return sum(g["correct"] for g in self.generations)

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.generations)

    @property
    def cut(self) -> int:
        """How many answers reached ``max_new_tokens`` without the end-of-turn token."""
        return sum(g["cut"] for g in self.generations)

    def summary(self) -> str:
        """e.g. ``exact match 0.0% — 50 of 50 answers were cut at 16 tokens: raise eval.max_new_tokens``."""
        rule = "" if self.match == "exact" else f" (eval.match={self.match})"
        note = cut_note(self.cut, len(self.generations), self.max_new_tokens)
        return f"exact match {self.accuracy:.1%}{rule}" + (f" — {note}" if note else "")

    def metrics(self) -> dict:
        """The numbers for a metrics or report file."""
        return {
            "exact_match": self.accuracy,
            "cut": self.cut,
            "examples": len(self.generations),
            "max_new_tokens": self.max_new_tokens,
            "match": self.match,
        }

    def format_mismatches(self, limit: int = 3) -> str:
        """The first ``limit`` wrong answers (prompt, expected, generated), or '' when none is wrong."""
        wrong = [g for g in self.generations if not g["correct"]]
        if not wrong:
            return ""
        lines = [f"{len(wrong)} of {len(self.generations)} test answers do not match (eval.match={self.match}):"]
        for g in wrong[:limit]:
            last_user = next((m["content"] for m in reversed(g["prompt"]) if m["role"] == "user"), "")
            notes = [n for n in (g["problem"], g["cut"] and f"cut at {self.max_new_tokens} tokens") if n]
            lines += [
                f"  prompt:    {_shown(last_user)}",
                f"  expected:  {_shown(g['expected'])}",
                f"  generated: {_shown(g['generated'])}" + (f"  ({'; '.join(notes)})" if notes else ""),
            ]
        return "\n".join(lines)


def exact_match_accuracy(
    model: nn.Module,
    tokenizer,
    examples: list[dict],
    max_new_tokens: int | None = None,
    match: str = "exact",
    progress: bool = False,
) -> ExactMatchResult:
    """Greedy answers to the test examples, compared with their references under ``match``
    (see ``pipelines.matching``); ``max_new_tokens`` None: sized from the references
    (``generation_budget``)."""
    if not examples:
        raise ValueError("exact-match accuracy needs at least one test example")
    check_references(match, examples)
    budget = generation_budget(tokenizer, examples, max_new_tokens)
    answers = generate_answers(model, tokenizer, [e["messages"] for e in examples], budget, progress=progress)
    generations = []
    for answer, example in zip(answers, examples):
        correct, problem = answers_match(match, answer.text, example["answer"])
        generations.append(
            {
                "prompt": example["messages"],
                "expected": example["answer"],
                "generated": answer.text,
                "correct": correct,
                "cut": answer.cut,
                "problem": problem,
            }
        )
    return ExactMatchResult(match, budget, generations)


GENERATIONS_FILE = "test_generations.jsonl"  # beside train's metrics.json and merge's report.json


def write_generations(path: str | Path, results: dict[str, ExactMatchResult]) -> None:
    """Every test generation as JSON lines, one per example: ``prompt`` and ``expected``, then per
    labelled result (e.g. ``before``, ``after``) ``generated``, ``correct``, ``cut`` and ``problem``."""
    runs = list(results.values())
    if len({len(r.generations) for r in runs}) > 1:
        raise ValueError("write_generations: the results are not on the same test examples")
    with Path(path).open("w", encoding="utf-8") as f:
        for rows in zip(*(r.generations for r in runs)):
            line = {"prompt": rows[0]["prompt"], "expected": rows[0]["expected"]}
            for label, row in zip(results, rows):
                line[label] = {k: row[k] for k in ("generated", "correct", "cut", "problem")}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def read_generations(path: str | Path, label: str, match: str, max_new_tokens: int) -> ExactMatchResult:
    """The result labelled ``label`` back from a :func:`write_generations` file."""
    generations = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        generations.append({"prompt": row["prompt"], "expected": row["expected"], **row[label]})
    return ExactMatchResult(match, max_new_tokens, generations)


# ---------------------------------------------------------------------------------------------
# The report of qlora-kit merge


class Collector:
    """The tensors of a checkpoint as a stock transformers model would load them, kept in memory.

    Float tensors are rounded to the checkpoint's dtype; quantized linears become
    scale * (q - zero) (exactly what packing.unpack_* gives back from the files).
    """

    def __init__(self, checkpoint_dtype: torch.dtype, eval_dtype: torch.dtype) -> None:
        self.checkpoint_dtype, self.eval_dtype = checkpoint_dtype, eval_dtype
        self.state: dict[str, Tensor] = {}

    def add(self, tensors: dict[str, Tensor | IntQuantWeight]) -> None:
        for name, value in tensors.items():
            if isinstance(value, IntQuantWeight):
                t = value.dequantize(torch.float32)
            else:
                t = value.to(self.checkpoint_dtype)
            self.state[name] = t.to("cpu", self.eval_dtype)


def stock_model(config, state: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A stock transformers model holding ``state`` (lm_head tied when the config says so)."""
    model = skeleton_model(config, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n in missing if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(device).eval()


def load_test_examples(recipe: Recipe | None, limit: int | None) -> list[dict]:
    """The recipe's test split as {"messages": prompt, "answer": reference} (data.test; [] when none)."""
    from qlora_kit.data import test_examples

    if recipe is None or not recipe.data.test:
        return []
    examples, _ = test_examples(recipe.data.test, recipe.data)
    limit = limit or recipe.eval.max_test_examples
    return examples[:limit] if limit else examples


def load_validation(recipe: Recipe | None, tokenizer, batch_size: int = 8) -> list[dict] | None:
    """The recipe's validation split, tokenized as training tokenized it and padded into
    batches by its collator (None when there is none)."""
    from qlora_kit.data import DataCollator, build_datasets

    if recipe is None or not (recipe.data.validation or recipe.data.validation_split):
        return None
    # Unpacked: the loss is taken per example, with its own attention mask.
    validation = build_datasets(replace(recipe.data, packing=False), tokenizer, recipe.training.seed).validation
    if validation is None:
        return None
    collate = DataCollator(tokenizer)
    return [
        collate([validation[i] for i in range(start, min(start + batch_size, len(validation)))])
        for start in range(0, len(validation), batch_size)
    ]


@dataclass
class Evaluation:
    """What every model of the report is measured on: held-out perplexity, the loss on the recipe's
    validation split (as training reports it), and exact match on the test split under ``match``
    within ``max_new_tokens`` (None when there are no test examples)."""

    tokenizer: Any
    eval_ids: Tensor
    examples: list[dict]
    max_new_tokens: int | None
    match: str = "exact"
    validation: list[dict] | None = None  # padded batches of the recipe's validation split

    def __call__(self, model: nn.Module) -> tuple[dict, ExactMatchResult | None]:
        """The report row's numbers for ``model`` and its test result (None without test examples)."""
        row = {"perplexity": perplexity(model, self.eval_ids)}
        if self.validation:
            row["val_loss"] = response_loss(model, self.validation)
        if not self.examples:
            return row, None
        result = exact_match_accuracy(model, self.tokenizer, self.examples, self.max_new_tokens, self.match)
        row["exact_match"], row["cut"] = result.accuracy, result.cut
        return row, result


def format_report(report: dict) -> str:
    """The table printed at the end of a merge; with test examples, the answers the budget cut and a
    few wrong answers of the exported model (read back from its test_generations.jsonl)."""
    rows = report["results"]
    examples = report["test_examples"]
    known = (
        ("perplexity", "perplexity", "{:.3f}"),
        ("val_loss", "val loss", "{:.4f}"),
        ("exact_match", "exact match", "{:.1%}"),
        ("cut", "cut", f"{{}}/{examples}"),
        ("seconds", "seconds", "{}"),
    )
    cut = any(r.get("cut") for r in rows)  # the cut column only when the budget cut some answer
    columns = [c for c in known if any(c[0] in r for r in rows) and (c[0] != "cut" or cut)]
    lines = ["\n" + f"{'model':24}" + "".join(f"{title:>14}" for _, title, _ in columns)]
    for r in rows:
        cells = [fmt.format(r[key]) if key in r else "-" for key, _, fmt in columns]
        lines.append(f"{r['model']:24}" + "".join(f"{cell:>14}" for cell in cells))
    if report["eval_text"]:
        rule = "" if report["match"] in (None, "exact") else f" (eval.match={report['match']})"
        lines.append(
            f"\nperplexity on {report['eval_text']} ({report['eval_tokens']} tokens)"
            + (f", exact match{rule} on {examples} test examples" if examples else "")
        )
    if examples:
        most = max(rows, key=lambda r: r["cut"])
        if most["cut"]:
            lines.append(f"{most['model']}: {cut_note(most['cut'], examples, report['max_new_tokens'])}")
        directory = Path(report["out"])
        exported = read_generations(
            directory / report["generations"], report["exported"], report["match"], report["max_new_tokens"]
        )
        mismatches = exported.format_mismatches()
        if mismatches:
            lines.append(f"\n{report['exported']}: {mismatches}")
        lines.append(f"every test generation of every model: {directory / report['generations']}")
    if report.get("gguf_file"):
        lines.append(f"GGUF file {report['out']}/{report['gguf_file']} (and a Modelfile for Ollama), report.json")
        return "\n".join(lines)
    kind = "merged bf16" if report["quantize"] == "none" else report["quantize"].upper()
    lines.append(f"{kind} checkpoint and report.json in {report['out']}/")
    return "\n".join(lines)
