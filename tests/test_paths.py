"""Relative paths in recipes: the working directory first, then the folder of the recipe file that sets them."""

from pathlib import Path

import pytest

from qlora_kit.config import load_recipe, save_recipe
from qlora_kit.errors import MissingFileError

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_working_directory_first_then_the_recipe_folder(tmp_path, monkeypatch):
    recipe = write(tmp_path / "recipes/r.yaml", "data: {train: d/train.jsonl, validation: d/valid.jsonl}\n")
    write(tmp_path / "recipes/d/train.jsonl")
    write(tmp_path / "recipes/d/valid.jsonl")
    work = tmp_path / "work"
    write(work / "d/train.jsonl")  # shadows the one beside the recipe
    monkeypatch.chdir(work)
    r = load_recipe(recipe)
    assert r.data.train == str(work / "d/train.jsonl")
    assert r.data.validation == str(tmp_path / "recipes/d/valid.jsonl")


def test_overrides_resolve_against_the_working_directory_only(tmp_path, monkeypatch):
    recipe = write(tmp_path / "recipes/r.yaml", "data: {train: x.jsonl}\n")
    write(tmp_path / "recipes/t.jsonl")
    monkeypatch.chdir(write(tmp_path / "work/keep").parent)
    with pytest.raises(MissingFileError) as e:
        load_recipe(recipe, ["data.train=t.jsonl"], check_files=True)
    assert str(e.value) == (
        f"command-line override `data.train=t.jsonl`: data.train 't.jsonl' not found (looked for {tmp_path}/work/t.jsonl)"
    )


def test_a_base_recipe_resolves_against_its_own_folder(tmp_path, monkeypatch):
    write(tmp_path / "base/b.yaml", "data: {train: train.jsonl}\n")
    write(tmp_path / "base/train.jsonl")
    leaf = write(tmp_path / "leaf/l.yaml", "extends: ../base/b.yaml\ndata: {test: test.jsonl}\n")
    write(tmp_path / "leaf/test.jsonl")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(leaf, check_files=True)
    assert (r.data.train, r.data.test) == (str(tmp_path / "base/train.jsonl"), str(tmp_path / "leaf/test.jsonl"))


def test_missing_file_names_key_line_value_and_both_places(tmp_path, monkeypatch):
    recipe = write(tmp_path / "recipes/r.yaml", "lora: {r: 8}\ndata:\n  train: missing.jsonl\n")
    monkeypatch.chdir(write(tmp_path / "work/keep").parent)
    assert load_recipe(recipe).data.train == "missing.jsonl"  # only the CLI's check_files raises
    with pytest.raises(MissingFileError, match="not found") as e:
        load_recipe(recipe, check_files=True)
    assert str(e.value) == (
        f"{recipe}:3: data.train 'missing.jsonl' not found "
        f"(looked for {tmp_path}/work/missing.jsonl and {tmp_path}/recipes/missing.jsonl)"
    )
    assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.name_or_path", "smollm2"),
        ("model.name_or_path", "meta-llama/Llama-3.1-8B-Instruct"),
        ("data.train", "HuggingFaceH4/ultrachat_200k"),
        ("data.train", "tatsu-lab/alpaca"),
    ],
)
def test_hub_names_stay_as_written(tmp_path, key, value):
    recipe = write(tmp_path / "r.yaml", "data: {train: t}\n")
    r = load_recipe(recipe, [f"{key}={value}"], check_files=True)
    section, _, name = key.partition(".")
    assert getattr(getattr(r, section), name) == value


@pytest.mark.parametrize("value", ["models/llama/8b", "./model", "my-model", "weights.gguf"])
def test_model_paths_that_are_no_hub_id_must_exist(tmp_path, value):
    recipe = write(tmp_path / "r.yaml", "data: {train: t}\n")
    with pytest.raises(MissingFileError, match=f"model.name_or_path '{value}' not found"):
        load_recipe(recipe, [f"model.name_or_path={value}"], check_files=True)


def test_output_dir_stays_relative_to_the_working_directory(tmp_path):
    recipe = write(tmp_path / "r.yaml", "data: {train: t}\noutput: {dir: outputs/x}\n")
    assert load_recipe(recipe).output.dir == "outputs/x"


def test_shipped_recipes_load_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("quickstart.yaml", "quickstart-qat.yaml"):
        r = load_recipe(ROOT / "recipes" / name, check_files=True)
        for path in (r.data.train, r.data.validation, r.data.test):
            assert Path(path).is_file() and Path(path).is_relative_to(ROOT / "examples/date-iso"), path


def test_the_saved_recipe_loads_back_equal_from_elsewhere(tmp_path, monkeypatch):
    write(tmp_path / "recipes/train.jsonl")
    recipe = load_recipe(write(tmp_path / "recipes/r.yaml", "data: {train: train.jsonl}\n"), check_files=True)
    save_recipe(recipe, tmp_path / "out/recipe.yaml")
    monkeypatch.chdir(write(tmp_path / "elsewhere/keep").parent)
    assert load_recipe(tmp_path / "out/recipe.yaml", check_files=True) == recipe
