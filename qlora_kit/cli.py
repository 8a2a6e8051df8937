"""The ``qlora-kit`` command: a thin shell over the pipelines."""

from __future__ import annotations

import argparse
import logging
import sys

from qlora_kit.errors import UserInputError


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("qlora_kit").setLevel(logging.INFO)


def _train(args: argparse.Namespace) -> None:
    from qlora_kit.config import load_recipe
    from qlora_kit.pipelines.train import train

    train(load_recipe(args.recipe, args.overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-kit", description="QLoRA fine-tuning on NF4 bases.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune LoRA adapters as a recipe says")
    train.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. lora.r=8")
    train.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``qlora-kit`` and ``train.py``; bad input exits with status 2 and one message."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        args.run(args)
    except UserInputError as e:
        print(f"qlora-kit: error: {e}", file=sys.stderr)
        return 2
    return 0
