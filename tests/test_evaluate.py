"""The test-split evaluation of the before/after report: budget, cut answers, matching rules, shown generations.

The reference for the score is plain transformers + peft: the saved adapter on a stock
LlamaForCausalLM, greedy generation with the same budget, answers compared by hand.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from qlora_kit.config import MATCH_RULES
from qlora_kit.errors import UserInputError
from qlora_kit.model.adapters import add_lora, load_adapter_weights
from qlora_kit.model.load import load_quantized
from qlora_kit.pipelines.evaluate import exact_match_accuracy, generation_budget, write_generations
from qlora_kit.pipelines.matching import answers_match, check_references
from qlora_kit.pipelines.train import format_metrics, train


@pytest.fixture(scope="module")
def json_task(tmp_path_factory):
    """One-line JSON answers of more than 16 tokens, half of them one way, half the other."""
    path = tmp_path_factory.mktemp("json-task")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Item {i}: which fruit?"},
                {
                    "role": "assistant",
                    "content": json.dumps({"fruit": ("banana", "cherry")[i % 2], "color": "yellow", "ripe": True}),
                },
            ]
        }
        for i in range(64)
    ]
    for name, part in (("train", rows[:48]), ("valid", rows[48:56]), ("test", rows[56:])):
        (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return path


def peft_reference(model_dir: Path, adapter_dir: Path, test: list[dict], max_new_tokens: int) -> list[dict]:
    """Greedy answers of the adapter on a stock model, through peft: text and whether it ran out of tokens."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    answers = []
    for example in test:
        inputs = tokenizer.apply_chat_template(
            example["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        answers.append(
            {"text": tokenizer.decode(new, skip_special_tokens=True), "cut": tokenizer.eos_token_id not in new}
        )
    return answers


@pytest.mark.slow
def test_report_equals_peft_generation_and_counts_cut_answers(
    tmp_path, tiny_model_dir, json_task, make_recipe, caplog, capsys
):
    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        json_task,
        "eval.max_new_tokens=null",
        "data.max_seq_len=128",
        "training.max_steps=80",
        "training.learning_rate=1.0e-2",
    )
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        metrics = train(recipe)
    out = Path(recipe.output.dir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    test = [
        {"messages": r["messages"][:-1], "answer": r["messages"][-1]["content"]}
        for r in map(json.loads, (json_task / "test.jsonl").read_text().splitlines())
    ]
    longest = max(len(tokenizer(e["answer"], add_special_tokens=False)["input_ids"]) for e in test)

    # The budget comes from the data (room for the answer and its end-of-turn token), logged once.
    budget = metrics["test"]["max_new_tokens"]
    assert longest > 16 and budget > longest + 1
    assert sum("eval.max_new_tokens not set" in r.getMessage() for r in caplog.records) == 1
    assert metrics["test"] == {
        "examples": 8,
        "max_new_tokens": budget,
        "match": "exact",
        "generations": "test_generations.jsonl",
    }

    # The reported score, answers and cut count are those of the adapter on a stock model through peft.
    reference = peft_reference(tiny_model_dir, out, test, budget)
    correct = sum(a["text"].strip() == e["answer"] for a, e in zip(reference, test))
    assert 0 < correct
    assert metrics["after"]["test_exact_match"] == correct / len(test)
    assert metrics["after"]["test_cut"] == sum(a["cut"] for a in reference) == 0
    rows = [json.loads(line) for line in (out / "test_generations.jsonl").read_text().splitlines()]
    assert [r["after"]["generated"] for r in rows] == [a["text"] for a in reference]
    assert [r["expected"] for r in rows] == [e["answer"] for e in test]
    assert [r["prompt"] for r in rows] == [e["messages"] for e in test]
    assert all(r["before"]["cut"] for r in rows) and metrics["before"]["test_cut"] == 8  # the random base rambles
    printed = capsys.readouterr().out
    assert f"  cut at {budget} tokens" in printed and "8/8" in printed

    # At 16 tokens every answer is cut: the counter fires, as peft's stock generation agrees.
    lm = load_quantized(str(tiny_model_dir), device="cpu", compute_dtype="float32", progress=False)
    add_lora(lm, recipe.lora.r, recipe.lora.alpha, 0.0, recipe.lora.target_modules)
    load_adapter_weights(lm, out)
    short = exact_match_accuracy(lm, tokenizer, test, 16)
    reference = peft_reference(tiny_model_dir, out, test, 16)
    assert short.cut == sum(a["cut"] for a in reference) == 8
    assert short.accuracy == sum(a["text"].strip() == e["answer"] for a, e in zip(reference, test)) / 8 == 0
    assert short.summary() == "exact match 0.0% — 8 of 8 answers were cut at 16 tokens: raise eval.max_new_tokens"
    assert [g["generated"] for g in short.generations] == [a["text"] for a in reference]

    # Under json matching the cut answers do not parse: wrong, and shown with the reason.
    as_json = exact_match_accuracy(lm, tokenizer, test, 16, match="json")
    assert as_json.accuracy == 0 and all(g["problem"].startswith("not JSON") for g in as_json.generations)
    shown = as_json.format_mismatches()
    assert shown.startswith("8 of 8 test answers do not match (eval.match=json):")
    assert shown.count("  expected:  ") == 3 and "not JSON" in shown and "cut at 16 tokens" in shown

    report = format_metrics({**metrics, "after": {**metrics["after"], "test_cut": short.cut}}, out, short)
    assert "after training: exact match 0.0% — 8 of 8 answers were cut at 16 tokens" in report


def test_matching_rules():
    assert answers_match("exact", " 2021-03-05\n", "2021-03-05") == (True, None)
    assert answers_match("exact", "Yes", "yes")[0] is False
    assert answers_match("normalized", "  The  Answer\n is\tYES ", "the answer is yes") == (True, None)
    assert answers_match("normalized", "the answer is yes.", "the answer is yes")[0] is False
    answer = '{"name": "Ann", "tags": ["a", "b"], "age": 31, "ok": true}'
    assert answers_match("json", '{"ok":true,"age":31.0,"tags":["a","b"],"name":"Ann"}', answer) == (True, None)
    assert answers_match("json", '{"ok": 1, "age": 31, "tags": ["a", "b"], "name": "Ann"}', answer)[0] is False
    assert answers_match("json", '{"ok": true, "age": 31, "tags": ["b", "a"], "name": "Ann"}', answer)[0] is False
    assert answers_match("json", '{"ok": true, "age": 31, "tags": ["a", "b"]}', answer)[0] is False
    correct, problem = answers_match("json", '{"name": "Ann", "tags": ["a"', answer)
    assert correct is False and problem.startswith("not JSON: ")


def test_every_recipe_match_rule_is_implemented():
    """config.MATCH_RULES (what a recipe may name) is the set of rules answers_match implements."""
    for rule in MATCH_RULES:
        assert answers_match(rule, '"a"', '"a"') == (True, None), rule
    with pytest.raises(ValueError, match="expected one of exact, normalized, json"):
        answers_match("fuzzy", "a", "a")


def test_json_reference_that_does_not_parse_is_named():
    examples = [{"messages": [], "answer": '{"a": 1}'}, {"messages": [], "answer": "{a: 1}"}]
    check_references("exact", examples)
    with pytest.raises(
        UserInputError, match=r"data.test example 2: eval.match is json but the reference answer is not JSON"
    ):
        check_references("json", examples)


def test_budget_from_the_longest_answer(tiny_model_dir, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [{"messages": [], "answer": a} for a in ("short", "a much longer answer " * 6, "mid length answer")]
    longest = len(tokenizer(examples[1]["answer"], add_special_tokens=False)["input_ids"])
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        budget = generation_budget(tokenizer, examples)
        assert generation_budget(tokenizer, examples, 100) == 100
        assert generation_budget(tokenizer, examples, 4) == 4
    assert budget >= longest + 9
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(f"eval.max_new_tokens not set: generating up to {budget} tokens")
    assert len(messages) == 2 and messages[1].startswith("eval.max_new_tokens=4 leaves no room")


def test_cut_answers_of_a_random_model_match_plain_generation(tmp_path, tiny_model_dir):
    """Without an adapter the tiny random model rambles: every answer is cut, as stock generate shows."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    test = [{"messages": [{"role": "user", "content": f"Question {i}"}], "answer": "banana"} for i in range(3)]
    result = exact_match_accuracy(model, tokenizer, test, 5)
    plain = []
    for example in test:
        inputs = tokenizer.apply_chat_template(
            example["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        new = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        plain.append((tokenizer.decode(new, skip_special_tokens=True), tokenizer.eos_token_id not in new.tolist()))
    assert [(g["generated"], g["cut"]) for g in result.generations] == plain
    assert result.cut == sum(cut for _, cut in plain) == 3
    assert result.metrics() == {"exact_match": 0.0, "cut": 3, "examples": 3, "max_new_tokens": 5, "match": "exact"}

    write_generations(tmp_path / "g.jsonl", {"before": result, "after": result})
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert rows[0] == {
        "prompt": test[0]["messages"],
        "expected": "banana",
        **{
            stage: {"generated": plain[0][0], "correct": False, "cut": True, "problem": None}
            for stage in ("before", "after")
        },
    }
