"""The recipe layer: loading, extends, overrides, errors that name key and place, save."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from qlora_kit.config import (
    DataSection,
    Recipe,
    RecipeError,
    load_recipe,
    recipe_to_dict,
    save_recipe,
)

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def dotted_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in tree.items():
        keys.add(prefix + name)
        if isinstance(value, dict):
            keys |= dotted_keys(value, prefix + name + ".")
    return keys


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    return write(tmp_path / "min.yaml", "data:\n  train: data/train.jsonl\n")


def error(path, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# --- loading, extends, overrides -------------------------------------------------------


def test_minimal_recipe_takes_the_dataclass_defaults(minimal):
    recipe = load_recipe(minimal)
    assert recipe == Recipe(data=DataSection(train="data/train.jsonl"))
    assert isinstance(recipe.lora.r, int) and recipe.training.learning_rate == 2.0e-4
    assert recipe.output.dir == "outputs/run"  # relative paths are not resolved here


def test_extends_chain_and_precedence(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", "data: {train: root.jsonl}\nlora: {r: 4, alpha: 8, dropout: 0.1}\n")
    # `extends` is relative to the extending file, not to the working directory.
    write(tmp_path / "sub" / "mid.yaml", "extends: ../root.yaml\nlora: {r: 32, alpha: 64}\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml", "extends: mid.yaml\nlora: {r: 64}\n")
    recipe = load_recipe(leaf, ["lora.alpha=7", "training.learning_rate=1e-5"])
    assert recipe.lora.dropout == 0.1  # only the root sets it
    assert recipe.lora.r == 64  # leaf file beats its bases
    assert recipe.lora.alpha == 7  # the command line beats every file
    assert recipe.training.learning_rate == 1e-5  # YAML 1.1 would read "1e-5" as a string
    assert recipe.data.train == "root.jsonl"
    assert recipe.extends is None  # the chain is merged in


def test_override_values_are_parsed_as_yaml(minimal):
    recipe = load_recipe(
        minimal,
        [
            "lora.target_modules=[q_proj,v_proj]",
            "training.gradient_checkpointing=false",
            "qat.activation_bits=8",
            "training.eval_steps=null",
            "data.system_prompt=Be brief.",
        ],
    )
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.training.gradient_checkpointing is False
    assert recipe.qat.activation_bits == 8
    assert recipe.data.system_prompt == "Be brief."


def test_interpolation_resolves_and_a_broken_one_names_the_key(tmp_path):
    path = write(tmp_path / "r.yaml", "data: {train: t}\noutput:\n  dir: out/${model.name_or_path}\n")
    assert load_recipe(path).output.dir == "out/smollm2"
    assert error(path, ["output.dir=${nope}"]) == (
        "command-line override `output.dir=${nope}`: invalid value for 'output.dir': Interpolation key 'nope' not found"
    )


def test_empty_section_is_allowed(tmp_path):
    path = write(tmp_path / "r.yaml", "data: {train: t.jsonl}\nqat:\n  # enabled: true\n")
    assert load_recipe(path).qat == Recipe().qat


# --- errors: each names the key, the place, and for unknown keys a suggestion ----------


def test_unknown_key_in_file_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path / "my.yaml", "data:\n  train: t.jsonl\nlora:\n  alpha: 8\n  rank: 8\n")
    assert error(path) == f"{path}:5: unknown key 'lora.rank' — did you mean 'lora.r'?"


def test_unknown_key_in_a_base_recipe_names_the_base_file(tmp_path):
    write(tmp_path / "base.yaml", "trainig:\n  seed: 1\n")
    leaf = write(tmp_path / "leaf.yaml", "extends: base.yaml\ndata: {train: t.jsonl}\n")
    assert error(leaf) == (f"{tmp_path / 'base.yaml'}:1: unknown key 'trainig' — did you mean 'training'?")


def test_unknown_key_in_override_and_key_in_the_wrong_section(minimal):
    assert error(minimal, ["lora.rank=8"]) == (
        "command-line override `lora.rank=8`: unknown key 'lora.rank' — did you mean 'lora.r'?"
    )
    assert "did you mean 'quantization.kernel'?" in error(minimal, ["model.kernel=torch"])
    assert "did you mean" not in error(minimal, ["zzz=1"])


@pytest.mark.parametrize(
    "yaml_value, expected",
    [
        ("abc", "could not be converted to Integer"),
        ("2.5", "could not be converted to Integer"),
        ("null", "Incompatible value 'None'"),
    ],
)
def test_wrong_type_names_key_and_line(tmp_path, yaml_value, expected):
    path = write(tmp_path / "r.yaml", f"data:\n  train: t.jsonl\nlora:\n  r: {yaml_value}\n")
    message = error(path)
    assert message.startswith(f"{path}:4: invalid value for 'lora.r': ")
    assert expected in message


def test_wrong_type_in_override(minimal):
    assert error(minimal, ["training.gradient_checkpointing=maybe"]).startswith(
        "command-line override `training.gradient_checkpointing=maybe`: "
        "invalid value for 'training.gradient_checkpointing'"
    )


def test_a_mapping_for_a_list_or_value_names_the_override_and_the_key(minimal, tmp_path):
    """A mapping given for a key whose value is a list (or checked as one) is that key's error, from where it was set."""
    assert error(minimal, ["lora.target_modules={x: 1}"]).startswith(
        "command-line override `lora.target_modules={x: 1}`: invalid value {'x': 1} for 'lora.target_modules'"
    )
    listed = write(tmp_path / "pairs.yaml", f"extends: {minimal}\npreference:\n  loss_type: [sigmoid, sft]\n")
    assert error(listed, ["preference.loss_type={a: 1}"]).startswith(
        "command-line override `preference.loss_type={a: 1}`: invalid value for 'preference.loss_type': "
    )
    mapped = write(
        tmp_path / "mapped.yaml", f"extends: {listed}\ntraining:\n  seed: 3\npreference:\n  loss_type: {{a: 1}}\n"
    )
    assert error(mapped).startswith(f"{mapped}:5: invalid value for 'preference.loss_type': ")


def test_section_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path / "r.yaml", "data: {train: t.jsonl}\nlora: 8\n")
    message = error(path)
    assert message.startswith(f"{path}:2: 'lora' is a section and must be a mapping")
    assert "target_modules" in message


def test_missing_required_value(tmp_path, minimal):
    empty = write(tmp_path / "empty.yaml", "lora: {r: 8}\n")
    assert error(empty) == (
        f"{empty}: missing required value 'data.train' — set it in the recipe or on the command line (data.train=...)"
    )
    marked = write(tmp_path / "marked.yaml", "lora: {r: 8}\ndata:\n  train: ???\n")
    assert error(marked).startswith(f"{marked}:3: missing required value 'data.train'")
    assert load_recipe(empty, ["data.train=x.jsonl"]).data.train == "x.jsonl"


@pytest.mark.parametrize(
    "override, key, expected",
    [
        (
            "training.optimizer=sgd",
            "training.optimizer",
            "must be one of: paged_adamw_8bit, paged_adamw_32bit, adamw_8bit, adamw",
        ),
        ("quantization.kernel=cuda", "quantization.kernel", "must be one of: auto, triton, torch"),
        ("model.compute_dtype=fp16", "model.compute_dtype", "bfloat16, float16, float32"),
        ("qat.activation_bits=4", "qat.activation_bits", "must be one of: null, 8"),
        ("lora.r=0", "lora.r", "must be > 0"),
        ("lora.target_modules=all_linear", "lora.target_modules", "'all-linear' or a non-empty list"),
        ("lora.target_modules=[]", "lora.target_modules", "'all-linear' or a non-empty list"),
        ("data.validation_split=1.0", "data.validation_split", "must be in [0, 1)"),
        ("data.validation_split=-0.1", "data.validation_split", "must be in [0, 1)"),
        ("training.max_steps=0", "training.max_steps", "-1 (use epochs) or > 0"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens", "must be null or > 0"),
        ("eval.match=regex", "eval.match", "must be one of: exact, normalized, json"),
        ("preference.loss_type=dpop", "preference.loss_type", "sigmoid_norm; or a list of them"),
        ("preference.loss_type=[sigmoid,dpop]", "preference.loss_type", "'dpop' is not one of TRL's DPO loss types"),
        ("qat.bits=3", "qat.bits", "bits must be 4"),  # only with qat.format=nf4, below
    ],
)
def test_invalid_choice_or_range_from_override(minimal, override, key, expected):
    overrides = ["qat.format=nf4", override] if key == "qat.bits" else [override]
    message = error(minimal, overrides)
    assert message.startswith(f"command-line override `{override}`: invalid value ")
    assert f"for '{key}'" in message and expected in message


def test_retired_quantization_keys_load_with_one_warning_line(tmp_path, caplog):
    """An older adapter's recipe.yaml sets them to their only value; any other value is an error."""
    old = write(
        tmp_path / "old.yaml",
        "data: {train: t.jsonl}\nquantization:\n  quant_type: nf4\n  double_quant: true\n  blocksize: 64\n",
    )
    with caplog.at_level("WARNING", logger="qlora_kit.config"):
        recipe = load_recipe(old)
    assert recipe == Recipe(data=DataSection(train="t.jsonl"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{old}:3: deprecated keys with no effect, remove them: "
        "quantization.quant_type, quantization.double_quant, quantization.blocksize"
    ]
    assert "quantization.blocksize" not in recipe_to_dict(recipe)["quantization"]
    assert error(old, ["quantization.blocksize=128"]) == (
        "command-line override `quantization.blocksize=128`: invalid value 128 for 'quantization.blocksize' — "
        "the base weights are always NF4 with double quantization in blocks of 64 (the bitsandbytes layout); "
        "'quantization.blocksize' is deprecated: remove it"
    )
    bad = write(tmp_path / "bad.yaml", "data: {train: t.jsonl}\nquantization:\n  double_quant: false\n")
    assert error(bad).startswith(f"{bad}:3: invalid value False for 'quantization.double_quant'")
    assert "'quantization.quant_type'" in error(old, ["quantization.quant_type=fp4"])


def test_invalid_choice_in_file_names_its_line(tmp_path):
    write(tmp_path / "base.yaml", "training:\n  seed: 1\n  optimizer: lion\n")
    leaf = write(tmp_path / "leaf.yaml", "extends: base.yaml\ndata: {train: t.jsonl}\n")
    assert error(leaf).startswith(f"{tmp_path / 'base.yaml'}:3: invalid value 'lion' for 'training.optimizer'")
    # The same bad value, fixed on the command line, loads.
    assert load_recipe(leaf, ["training.optimizer=adamw"]).training.optimizer == "adamw"


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error(missing).startswith(f"cannot read recipe file {missing}")
    bad = write(tmp_path / "bad.yaml", "data:\n  train: t.jsonl\nlora: [1, 2\n")
    assert re.match(rf"{re.escape(str(bad))}:\d+: invalid YAML: ", error(bad))
    assert error(write(tmp_path / "list.yaml", "- a\n- b\n")).endswith(
        "the top level must be a mapping of sections (model:, lora:, ...), got list"
    )
    dup = write(tmp_path / "dup.yaml", "lora:\n  r: 4\n  r: 8\n")
    assert error(dup) == f"{dup}:3: duplicate key 'lora.r' (also on line 2)"


def test_extends_errors(tmp_path):
    leaf = write(tmp_path / "leaf.yaml", "data: {train: t}\nextends: gone.yaml\n")
    assert error(leaf) == f"{leaf}:2: extends: recipe file not found: {tmp_path / 'gone.yaml'}"
    a = write(tmp_path / "a.yaml", "extends: b.yaml\n")
    b = write(tmp_path / "b.yaml", "extends: a.yaml\n")
    assert error(a) == f"extends cycle: {a} -> {b} -> {a}"
    assert error(write(tmp_path / "c.yaml", "extends: [x]\n")).endswith(":1: 'extends' must be a path, got ['x']")


def test_bad_override_syntax(minimal):
    assert error(minimal, ["lora.r"]) == ("bad command-line override `lora.r`: expected key=value, e.g. lora.r=8")
    assert error(minimal, ["lora..r=8"]).startswith("bad command-line override `lora..r=8`")
    assert error(minimal, ["lora.target_modules=[a,"]).startswith(
        "command-line override `lora.target_modules=[a,`: cannot parse the value"
    )
    assert "can only be set in a recipe file" in error(minimal, ["extends=x.yaml"])


# --- saving, and the reference recipe ------------------------------------------------


def test_save_load_round_trip(tmp_path, minimal):
    recipe = load_recipe(
        minimal,
        [
            "lora.target_modules=[q_proj,v_proj]",
            "qat.enabled=true",
            "training.learning_rate=3e-5",
            "data.validation_split=0.1",
        ],
    )
    out = tmp_path / "out" / "recipe.yaml"
    save_recipe(recipe, out)
    assert load_recipe(out) == recipe
    assert yaml.safe_load(out.read_text()) == recipe_to_dict(recipe)
    assert recipe_to_dict(recipe)["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_base_yaml_is_exactly_the_dataclass_defaults():
    base = REPO / "recipes" / "base.yaml"
    # Every key, with the same value: the reference cannot drift from the code.
    assert yaml.safe_load(base.read_text()) == dataclasses.asdict(Recipe())
    assert load_recipe(base, ["data.train=t.jsonl"]) == Recipe(data=DataSection(train="t.jsonl"))
    lines = base.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip().startswith("train: ???"))
    assert error(base).startswith(f"{base}:{line}: missing required value 'data.train'")


def test_recipe_doc_describes_every_key():
    doc = (REPO / "README.md").read_text()
    undocumented = {k for k in dotted_keys(dataclasses.asdict(Recipe())) if f"`{k}`" not in doc}
    assert not undocumented
