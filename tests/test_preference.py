"""DPO and ORPO: the recipe keys, the pairs, the adapters-off reference, and the losses against TRL's own trainers."""

import inspect
import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from transformers import LlamaForCausalLM

from qlora_kit.compat import DPO_LOSS_ATTRIBUTES, dpo_loss_step
from qlora_kit.config import RecipeError, load_recipe, save_recipe
from qlora_kit.data import DataError, to_messages
from qlora_kit.model.adapters import lora_modules, peft_config, read_adapter, save_adapter
from qlora_kit.model.sources import load_tokenizer, resolve_source
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.pipelines.builder import build_training_model
from qlora_kit.pipelines.preference import (
    _preference_trainer_class,
    answer_logps,
    with_reference_logps,
)
from qlora_kit.pipelines.train import train, training_arguments
from qlora_kit.preference_data import build_preference_datasets, pair_messages, preference_collator, tokenize_pair
from qlora_kit.quant.nf4 import dequantize_nf4_reference

PROMPTS = ["Say the fruit.", "Name a colour, please.", "Which animal barks?", "Count to two."]
CHOSEN = ["banana", "blue", "a dog", "one, two"]
REJECTED = ["apple pie", "green", "a cat, surely", "three"]


def _conversational(i: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": PROMPTS[i]}],
        "chosen": [{"role": "assistant", "content": CHOSEN[i]}],
        "rejected": [{"role": "assistant", "content": REJECTED[i]}],
    }


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """A learnable preference task: always prefer "banana"; plus an SFT-format test split."""
    path = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": f"Question {i}: say the word.", "chosen": "banana", "rejected": "apple"} for i in range(44)]
    _write(path / "train.jsonl", rows[:32])
    _write(path / "valid.jsonl", rows[32:40])
    _write(path / "test.jsonl", [{"prompt": r["prompt"], "completion": "banana"} for r in rows[40:]])
    return path


def _recipe(tmp_path, model_dir, task, *overrides):
    recipe_file = tmp_path / "recipe.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(
        f"model: {{name_or_path: '{model_dir}'}}\n"
        f"data: {{train: '{task}/train.jsonl', validation: '{task}/valid.jsonl', test: '{task}/test.jsonl', "
        "max_seq_len: 64}\n"
        "lora: {r: 8, alpha: 16}\n"
        "training: {method: dpo, max_steps: 12, batch_size: 8, learning_rate: 3.0e-3, warmup_ratio: 0.0, "
        "logging_steps: 1, save_steps: 100, lr_scheduler: constant}\n"
        "eval: {max_new_tokens: 4}\n"
        f"output: {{dir: '{tmp_path / 'out'}', report_to: none}}\n"
    )
    return load_recipe(recipe_file, list(overrides))


# --- recipe ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["training.method=kto"], "training.method"),
        (["preference.loss_type=dpop"], "preference.loss_type"),
        (["preference.beta=0"], "preference.beta"),
        (["data.packing=true"], "data.packing"),
        (["data.format=messages"], "data.format"),
        (["data.train_on_prompt=true"], "data.train_on_prompt"),
        (["preference.max_prompt_len=64"], "preference.max_prompt_len"),
        (["preference.reference_adapter=/tmp/sft"], "preference.reference_adapter"),
        (["preference.loss_type=exo_pair"], "preference.label_smoothing"),
        (["preference.loss_type=[sigmoid,exo_pair]"], "preference.label_smoothing"),
        (["preference.loss_type=[sigmoid,dpop]"], "preference.loss_type"),
        (["preference.loss_type=[]"], "preference.loss_type"),
        (["preference.loss_type=[sigmoid,sigmoid]"], "preference.loss_type"),
        (["preference.loss_type={sigmoid: 1.0}"], "preference.loss_type"),
        (["preference.loss_weights=[2.0]"], "preference.loss_weights"),
        (["preference.loss_type=[sigmoid,sft]", "preference.loss_weights=[1.0]"], "preference.loss_weights"),
        (["preference.loss_type=[sigmoid,sft]", "preference.loss_weights=[1.0,0.0]"], "preference.loss_weights"),
        (["preference.loss_type=[sigmoid,sft]", "preference.loss_weights=[1.0,x]"], "preference.loss_weights[1]"),
        (["training.method=orpo", "preference.loss_weights=[1.0]"], "preference.loss_weights"),
        (["training.method=orpo", "preference.loss_type=[sigmoid,sft]"], "preference.loss_type"),
        (["training.method=orpo", "preference.loss_type=ipo"], "preference.loss_type"),
        (["training.method=orpo", "preference.precompute_reference=true"], "preference.precompute_reference"),
        (["training.method=sft", "preference.init_adapter=/tmp/sft"], "preference.init_adapter"),
    ],
)
def test_inconsistent_preference_recipes_name_the_key(tmp_path, overrides, key):
    (tmp_path / "r.yaml").write_text("data: {train: t.jsonl, max_seq_len: 64}\ntraining: {method: dpo}\n")
    with pytest.raises(RecipeError, match=re.escape(f"'{key}'")):
        load_recipe(tmp_path / "r.yaml", overrides)


def test_orpo_may_score_the_prompt_and_sft_ignores_the_section(tmp_path):
    (tmp_path / "r.yaml").write_text("data: {train: t.jsonl, packing: true}\npreference: {loss_type: ipo}\n")
    assert load_recipe(tmp_path / "r.yaml").training.method == "sft"
    assert load_recipe(
        tmp_path / "r.yaml",
        ["training.method=orpo", "data.packing=false", "preference.loss_type=sigmoid", "data.train_on_prompt=true"],
    ).data.train_on_prompt


def test_a_list_of_loss_types_loads_as_trls_loss_type_and_loss_weights(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "data: {train: t.jsonl}\ntraining: {method: dpo}\npreference: {loss_type: [sigmoid, sft]}\n"
    )
    assert load_recipe(tmp_path / "r.yaml").preference.losses() == (["sigmoid", "sft"], [1.0, 1.0])
    recipe = load_recipe(tmp_path / "r.yaml", ["preference.loss_weights=[1, 0.25]"])
    assert recipe.preference.losses() == (["sigmoid", "sft"], [1.0, 0.25])
    save_recipe(recipe, tmp_path / "saved.yaml")  # an adapter's recipe.yaml reloads as it was trained
    assert load_recipe(tmp_path / "saved.yaml") == recipe
    assert load_recipe(tmp_path / "r.yaml", ["preference.loss_type=ipo"]).preference.losses() == (["ipo"], [1.0])


def test_adapter_of_another_shape_stops_before_the_model_loads(tmp_path, tiny_model_dir, pair_files):
    from qlora_kit.pipelines.preference import check_adapters

    recipe = _recipe(tmp_path, tiny_model_dir, pair_files, "lora.r=4", "lora.alpha=8")
    lm = build_training_model(recipe, "cpu", source=resolve_source(str(tiny_model_dir)), progress=False).lm
    save_adapter(lm, tmp_path / "a", peft_config(lm, 4, 8, 0.0, False, str(tiny_model_dir)))
    check_adapters(
        _recipe(
            tmp_path,
            tiny_model_dir,
            pair_files,
            "lora.r=4",
            "lora.alpha=8",
            f"preference.init_adapter={tmp_path / 'a'}",
        )
    )
    with pytest.raises(RecipeError, match=r"preference\.init_adapter: .*r=4.*lora\.r=8"):
        check_adapters(_recipe(tmp_path, tiny_model_dir, pair_files, f"preference.init_adapter={tmp_path / 'a'}"))
    with pytest.raises(RecipeError, match=r"preference\.reference_adapter: no adapter_config\.json"):
        check_adapters(
            _recipe(
                tmp_path,
                tiny_model_dir,
                pair_files,
                "preference.precompute_reference=true",
                f"preference.reference_adapter={tmp_path}",
            )
        )


# --- data -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_source("smollm2"))


def test_string_explicit_and_implicit_prompts_give_the_same_pair(tokenizer):
    conversational = _conversational(0)
    strings = {"prompt": PROMPTS[0], "chosen": CHOSEN[0], "rejected": REJECTED[0]}
    implicit = {
        "chosen": conversational["prompt"] + conversational["chosen"],
        "rejected": conversational["prompt"] + conversational["rejected"],
    }
    pairs = [pair_messages(row) for row in (conversational, strings, implicit)]
    assert pairs[0] == pairs[1] == pairs[2]
    assert to_messages(strings, "preference") == pairs[0][0] + pairs[0][1]  # SFT reads a pair as prompt + chosen


def test_tokenized_pairs_equal_trl_dpo_trainer_tokenization(tmp_path, tokenizer, tiny_model_dir):
    from trl import DPOConfig, DPOTrainer

    rows = [_conversational(i) for i in range(len(PROMPTS))]
    ours = [tokenize_pair(*pair_messages(row), tokenizer, max_seq_len=1024) for row in rows]
    stock = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=None)
    theirs = DPOTrainer(
        model=stock, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    for mine, row in zip(ours, theirs.train_dataset):
        assert {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} == mine
    assert tokenizer.decode(ours[0]["chosen_ids"]).startswith("banana<|im_end|>")


def test_max_prompt_len_keeps_the_prompt_end_and_max_seq_len_cuts_answers(tokenizer):
    full = tokenize_pair(*pair_messages(_conversational(1)), tokenizer, max_seq_len=1024)
    cut = tokenize_pair(*pair_messages(_conversational(1)), tokenizer, max_seq_len=12, max_prompt_len=10)
    assert cut["prompt_ids"] == full["prompt_ids"][-10:]
    assert cut["chosen_ids"] == full["chosen_ids"][:2] and cut["rejected_ids"] == full["rejected_ids"][:2]
    assert tokenize_pair(*pair_messages(_conversational(1)), tokenizer, max_seq_len=len(full["prompt_ids"])) is None


def _data_cfg(tmp_path, **overrides):
    (tmp_path / "r.yaml").write_text("data: {train: t.jsonl}\ntraining: {method: dpo}\n")
    recipe = load_recipe(tmp_path / "r.yaml", [f"data.{k}={v}" for k, v in overrides.items()])
    return recipe.data


def test_a_malformed_pair_names_file_and_row_or_is_skipped(tmp_path, tokenizer):
    rows = [_conversational(i) for i in range(3)]
    rows[1] = {"prompt": "Hi", "chosen": "same", "rejected": "same"}
    rows.append({"prompt": "Hi", "chosen": [{"role": "robot", "content": "x"}], "rejected": "y"})
    train = _write(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{train}: row 2: 'chosen' and 'rejected' are the same answer")):
        build_preference_datasets(_data_cfg(tmp_path, train=train), tokenizer, seed=0)
    data = build_preference_datasets(_data_cfg(tmp_path, train=train, on_bad_row="skip"), tokenizer, seed=0)
    assert (len(data.train), data.skipped) == (2, 2)
    sft_rows = _write(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match=r"sft\.jsonl: preference pairs need columns 'chosen' and 'rejected'"):
        build_preference_datasets(_data_cfg(tmp_path, train=sft_rows), tokenizer, seed=0)


# --- model: log-probs and the reference -----------------------------------------------------


def _models(tmp_path, model_dir, recipe):
    """Our NF4 model with random adapters, and the stock transformers + peft model with the same weights."""
    from peft import PeftModel

    built = build_training_model(recipe, "cpu", source=resolve_source(str(model_dir)), progress=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(built.lm).values():
            m.lora_B.weight.normal_(0, 0.05)
    save_adapter(built.lm, tmp_path / "adapter", built.adapter_config)
    stock = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, m in built.lm.named_modules():
            if isinstance(m, NF4Linear):
                stock.get_submodule(name.removesuffix(".base")).weight.copy_(dequantize_nf4_reference(m.nf4_weight))
    peft_model = PeftModel.from_pretrained(stock, tmp_path / "adapter", is_trainable=True)
    return built, peft_model


def _batch(tokenizer, rows):
    pairs = [tokenize_pair(*pair_messages(row), tokenizer, max_seq_len=1024) for row in rows]
    return pairs, preference_collator(tokenizer)(pairs)


@pytest.mark.parametrize("fused", [True, False])
def test_policy_and_adapters_off_reference_equal_the_stock_models(
    tmp_path, tiny_model_dir, pair_files, tokenizer, fused
):
    recipe = _recipe(tmp_path, tiny_model_dir, pair_files, f"training.fused_kernels={str(fused).lower()}")
    built, peft_model = _models(tmp_path, tiny_model_dir, recipe)
    _, batch = _batch(tokenizer, [_conversational(i) for i in range(4)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)

    def stock_logps(model):  # float64 log-softmax of the stock model's logits at the answer tokens
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
        picked = logits.log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (labels[:, 1:] != -100)).sum(1)

    with torch.no_grad():
        policy, _ = answer_logps(built.model, batch)
        reference, _ = answer_logps(built.model, batch, reference=True)
        stock_policy = stock_logps(peft_model)
        with peft_model.disable_adapter():
            stock_base = stock_logps(peft_model)
    torch.testing.assert_close(policy.double(), stock_policy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(reference.double(), stock_base, atol=1e-4, rtol=1e-5)
    assert (policy - reference).abs().min() > 1e-3  # the adapters matter, and the reference switched them off
    assert all(m.scaling == 2.0 for m in lora_modules(built.lm).values())  # switched back on


def test_a_reference_adapter_scores_the_pairs_then_gives_the_weights_back(
    tmp_path, tiny_model_dir, pair_files, tokenizer
):
    recipe = _recipe(tmp_path, tiny_model_dir, pair_files)
    trained, _ = _models(tmp_path, tiny_model_dir, recipe)  # random adapters, saved to tmp_path/adapter
    pairs, batch = _batch(tokenizer, [_conversational(i) for i in range(4)])
    with torch.no_grad():
        expected, _ = answer_logps(trained.model, batch)
    fresh = build_training_model(recipe, "cpu", source=resolve_source(str(tiny_model_dir)), progress=False)
    before = {k: v.clone() for k, v in fresh.lm.state_dict().items() if "lora_" in k}
    scored = with_reference_logps(
        fresh.model,
        datasets.Dataset.from_list(pairs),
        preference_collator(tokenizer),
        3,
        torch.device("cpu"),
        adapter=str(tmp_path / "adapter"),
    )
    got = torch.tensor(list(scored["ref_chosen_logps"]) + list(scored["ref_rejected_logps"]))
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
    after = {k: v for k, v in fresh.lm.state_dict().items() if "lora_" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_chunked_sft_loss_and_its_gradients_equal_the_full_logits_ones(tmp_path, tiny_model_dir, pair_files):
    from qlora_kit.model.sft import causal_lm_loss, plain_causal_lm_loss

    recipe = _recipe(tmp_path, tiny_model_dir, pair_files, "training.method=sft")
    built, peft_model = _models(tmp_path, tiny_model_dir, recipe)
    ids = torch.randint(0, 1000, (3, 11))
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.4, -100)
    mask = torch.ones_like(ids)
    losses, grads = [], []
    for loss_fn in (
        lambda: causal_lm_loss(built.lm, ids, labels, chunk_tokens=4, attention_mask=mask),
        lambda: plain_causal_lm_loss(built.lm, ids, labels, attention_mask=mask),
    ):
        built.lm.zero_grad()
        loss = loss_fn()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in built.lm.parameters() if p.requires_grad]))
    logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    reference = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)
    torch.testing.assert_close(losses[0].double(), reference.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_trl_dpo_loss_step_reads_only_the_attributes_we_set():
    source = inspect.getsource(dpo_loss_step())
    read = set(re.findall(r"self\.(\w+)", source)) - {"args"}
    assert read == set(DPO_LOSS_ATTRIBUTES)


def _our_trainer(recipe, built, tokenizer, train_dataset):
    return _preference_trainer_class()(
        model=built.model,
        args=training_arguments(recipe, torch.device("cpu"), built.compute_dtype, False),
        train_dataset=train_dataset,
        data_collator=preference_collator(tokenizer),
        processing_class=tokenizer,
        adapter_config=built.adapter_config,
        method=recipe.training.method,
        preference=recipe.preference,
        nll_on_prompt=recipe.data.train_on_prompt,
    )


@pytest.mark.parametrize(
    "loss_type, extra",
    [
        ("sigmoid", []),
        ("ipo", []),
        ("robust", ["preference.label_smoothing=0.1"]),
        ("apo_zero", []),
        # RPO: TRL's loss_type and loss_weights lists; a weight other than 1.0, so that ignoring it would show
        pytest.param(["sigmoid", "sft"], ["preference.loss_weights=[1.0,0.5]"], id="sigmoid+sft"),
    ],
)
def test_dpo_loss_equals_trl_dpo_trainer_on_stock_peft(
    tmp_path, tiny_model_dir, pair_files, tokenizer, loss_type, extra
):
    from trl import DPOConfig, DPOTrainer

    types = loss_type if isinstance(loss_type, str) else f"[{','.join(loss_type)}]"
    recipe = _recipe(
        tmp_path, tiny_model_dir, pair_files, f"preference.loss_type={types}", "preference.beta=0.5", *extra
    )
    built, peft_model = _models(tmp_path, tiny_model_dir, recipe)
    rows = [_conversational(i) for i in range(4)]
    pairs, batch = _batch(tokenizer, rows)
    ours = _our_trainer(recipe, built, tokenizer, datasets.Dataset.from_list(pairs))
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        max_length=None,
        beta=0.5,
        loss_type=[loss_type] if isinstance(loss_type, str) else loss_type,
        loss_weights=recipe.preference.loss_weights,
        label_smoothing=recipe.preference.label_smoothing,
    )
    theirs = DPOTrainer(
        model=peft_model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    # Given a trained adapter, TRL's reference is a copy of it; ours here is the base with the adapters off: so is
    # TRL's without that copy.
    theirs.model.delete_adapter("ref")
    trl_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
    assert torch.equal(trl_batch["input_ids"], batch["input_ids"])
    with torch.no_grad():
        our_loss = ours.compute_loss(built.model, batch)
        their_loss = theirs.compute_loss(theirs.model, trl_batch)
    torch.testing.assert_close(our_loss, their_loss, atol=1e-5, rtol=1e-4)
    for key in ("rewards/margins", "logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy"):
        assert ours._metrics["train"][key][0] == pytest.approx(theirs._metrics["train"][key][0], rel=1e-4, abs=1e-5)
    assert abs(ours._metrics["train"]["rewards/margins"][0]) > 1e-3  # policy and reference differ

    # Precomputed once up front, the reference gives the same loss.
    precomputed = with_reference_logps(
        built.model, datasets.Dataset.from_list(pairs), ours.data_collator, 3, torch.device("cpu")
    )
    ours.precompute_ref_logps = True
    with torch.no_grad():
        loss = ours.compute_loss(built.model, ours.data_collator([precomputed[i] for i in range(4)]))
    torch.testing.assert_close(loss, their_loss, atol=1e-5, rtol=1e-4)


def test_orpo_loss_equals_trl_orpo_trainer_on_stock_peft(tmp_path, tiny_model_dir, pair_files, tokenizer):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    recipe = _recipe(
        tmp_path, tiny_model_dir, pair_files, "training.method=orpo", "preference.beta=0.3", "data.train_on_prompt=true"
    )
    built, peft_model = _models(tmp_path, tiny_model_dir, recipe)
    rows = [_conversational(i) for i in range(4)]
    pairs, batch = _batch(tokenizer, rows)
    ours = _our_trainer(recipe, built, tokenizer, datasets.Dataset.from_list(pairs))
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, beta=0.3)
    strings = [{"prompt": PROMPTS[i], "chosen": CHOSEN[i], "rejected": REJECTED[i]} for i in range(4)]
    theirs = ORPOTrainer(
        model=peft_model, args=args, train_dataset=datasets.Dataset.from_list(strings), processing_class=tokenizer
    )
    # TRL's ORPO tokenizes raw strings its own way; give its loss our chat-template tokens instead.
    n = len(rows)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    trl_batch = {}
    for side, rows_ in (("chosen", slice(0, n)), ("rejected", slice(n, 2 * n))):
        trl_batch[f"{side}_input_ids"] = batch["input_ids"][rows_]
        trl_batch[f"{side}_attention_mask"] = batch["attention_mask"][rows_]
        trl_batch[f"{side}_labels"] = labels[rows_]
    with torch.no_grad():
        our_loss = ours.compute_loss(built.model, batch)
        their_loss, metrics = theirs.get_batch_loss_metrics(theirs.model, trl_batch)
    torch.testing.assert_close(our_loss, their_loss, atol=1e-5, rtol=1e-4)
    assert ours._metrics["train"]["nll_loss"][0] == pytest.approx(metrics["nll_loss"], rel=1e-4)
    assert ours._metrics["train"]["log_odds_ratio"][0] == pytest.approx(metrics["log_odds_ratio"], rel=1e-4)


# --- training -------------------------------------------------------------------------------


@pytest.mark.slow  # three short trainings
@pytest.mark.parametrize(
    "method, overrides",
    [
        ("dpo", []),
        ("dpo", ["preference.precompute_reference=true", "qat.enabled=true", "qat.group_size=32"]),
        ("orpo", ["training.gradient_checkpointing=false"]),
    ],
)
def test_a_short_run_lowers_the_loss_and_widens_the_margin(tmp_path, tiny_model_dir, pair_files, method, overrides):
    recipe = _recipe(
        tmp_path, tiny_model_dir, pair_files, f"training.method={method}", "training.save_steps=12", *overrides
    )
    metrics = train(recipe)
    before, after = metrics["before"], metrics["after"]
    assert after["val_loss"] < before["val_loss"]
    assert after["reward_margin"] > before["reward_margin"] + 0.05
    assert after["pref_accuracy"] == 1.0
    out = Path(recipe.output.dir)
    history = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 12 and losses[-1] < losses[0]
    # The adapter directory is an SFT one: PEFT files, the recipe, readable by the merger.
    adapter = read_adapter(out)
    assert adapter.recipe.training.method == method and adapter.lora


@pytest.mark.slow  # trains, merges, and exports with GPTQ
def test_merge_and_export_work_unchanged_on_a_dpo_adapter(tmp_path, tiny_model_dir, pair_files):
    from qlora_kit.pipelines.merge import MergeOptions, merge

    recipe = _recipe(tmp_path, tiny_model_dir, pair_files, "training.max_steps=4")
    train(recipe)
    report = merge(
        MergeOptions(
            recipe.output.dir,
            str(tmp_path / "gptq"),
            quantize="gptq",
            group_size=32,
            calibration_samples=4,
            calibration_seq_len=16,
            progress=False,
        )
    )
    row = report["results"][-1]
    # Calibrated on the pairs' prompts and chosen answers; validated on them as SFT rows; the test split generated.
    assert {"perplexity", "val_loss", "exact_match"} <= set(row)
    assert (tmp_path / "gptq" / "config.json").is_file()


@pytest.mark.slow  # launches two processes
def test_dpo_on_two_processes_equals_one_with_twice_the_accumulation(tmp_path, tiny_model_dir, accelerate_launch):
    task = tmp_path / "task"
    task.mkdir()
    row = {"prompt": "Say the word.", "chosen": "banana", "rejected": "apple"}
    for name, n in (("train", 32), ("valid", 4), ("test", 2)):
        _write(
            task / f"{name}.jsonl", [{"prompt": "Say the word.", "completion": "banana"} if name == "test" else row] * n
        )
    steps = ["training.max_steps=3", "training.batch_size=4", "training.save_steps=3", "data.test=null"]
    single = _recipe(tmp_path / "single", tiny_model_dir, task, *steps, "training.gradient_accumulation_steps=2")
    train(single)
    _recipe(tmp_path / "ddp", tiny_model_dir, task, *steps)  # writes tmp_path/ddp/recipe.yaml
    result = accelerate_launch("ddp-cpu.yaml", tmp_path / "ddp" / "recipe.yaml", *steps)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [
        json.loads((tmp_path / run / "out" / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
        for run in ("single", "ddp")
    ]
    a, b = ([(e["loss"], e["grad_norm"], e["rewards/margins"]) for e in log if "grad_norm" in e] for log in logs)
    assert len(a) == 3 and torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6)
    assert a[-1][2] > 0  # the margin opened


def test_the_shipped_pairs_are_the_seeded_scripts_and_checkable(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, str(root / "scripts/make_preference_dataset.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for split in ("train", "valid"):
        shipped = (root / "examples/date-iso-pref" / f"{split}.jsonl").read_text()
        assert (tmp_path / f"{split}.jsonl").read_text() == shipped
        for row in map(json.loads, shipped.splitlines()):
            assert row["chosen"][0]["content"] != row["rejected"][0]["content"].strip()
    recipe = load_recipe(root / "recipes/quickstart-dpo.yaml")
    assert recipe.training.method == "dpo" and Path(recipe.data.train).is_file()
