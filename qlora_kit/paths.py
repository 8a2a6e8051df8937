"""Where a recipe's relative paths point: the working directory first, then the recipe file's folder.

The path keys (:data:`PATH_KEYS`) name input files and folders. A relative path set in a
recipe file is looked up against the working directory and, where it is not found there,
against the folder of the file that sets it (a base recipe's own folder for a key it sets,
as for ``extends:``); one set on the command line, against the working directory only.
A path that is found becomes absolute, so the ``recipe.yaml`` a run saves works from any
directory. ``output.dir`` is not looked up: the run creates it, relative to the working
directory. A value that is not found and does not look like a path (``smollm2``, a hub id
``org/name``, a hub dataset name) stays as written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_kit.errors import MissingFileError

PATH_KEYS = (
    "model.name_or_path",
    "data.train",
    "data.validation",
    "data.test",
    "preference.init_adapter",
    "preference.reference_adapter",
)
_EMBEDDED_MODEL = "smollm2"
# The suffixes of the local files the data loader reads (a hub dataset name has none).
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def candidates(value: str, folder: Path | None) -> list[Path]:
    """Where a path value is looked for, in order: as given when absolute, else the working directory, then ``folder``."""
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return [path]
    places = [Path(os.path.abspath(path))]
    if folder is not None:
        in_folder = Path(os.path.abspath(folder / path))
        if in_folder != places[0]:
            places.append(in_folder)
    return places


def looks_like_path(key: str, value: str) -> bool:
    """Whether a value that exists nowhere must have been meant as a local path (rather than a hub name)."""
    if value.startswith(("/", "./", "../", "~")) or value in (".", ".."):
        return True
    if key == "model.name_or_path":
        # Hub model ids are org/name; resolve_source treats anything else as a local path.
        return value.endswith(".gguf") or len([p for p in value.split("/") if p]) != 2
    return Path(value).suffix.lower() in DATA_SUFFIXES


def resolve_paths(
    recipe: Any,
    where: Callable[[str], str],
    folders: dict[str, Path],
    check: bool = False,
) -> None:
    """Replace the recipe's relative input paths by the absolute paths found (in place).

    ``where(key)``: where the key was set (``file:line``); ``folders[key]``: the folder of the
    recipe file that set it (absent for command-line overrides and defaults). With ``check``,
    a value that looks like a path and exists nowhere raises :class:`MissingFileError` naming
    the key, the value as written and every place looked.
    """
    for key in PATH_KEYS:
        section_name, _, name = key.partition(".")
        section = getattr(recipe, section_name)
        value = getattr(section, name)
        if value is None or (key == "model.name_or_path" and value == _EMBEDDED_MODEL):
            continue
        places = candidates(value, folders.get(key))
        found = next((p for p in places if p.exists()), None)
        if found is not None:
            setattr(section, name, str(found))
        elif check and looks_like_path(key, value):
            looked = " and ".join(str(p) for p in places)
            raise MissingFileError(f"{where(key)}: {key} '{value}' not found (looked for {looked})")
