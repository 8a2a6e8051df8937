"""The ``qlora-kit`` command: a thin shell over the pipelines.

Every command runs through :func:`qlora_kit.errors.run_command`, the one place that turns a
failure the user caused into ``qlora-kit: error: ...`` and exit status 2; a new command
added to :func:`build_parser` gets it as it is.
"""

from __future__ import annotations

import argparse
import logging
import sys

from qlora_kit.errors import explain_resources, run_command


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("qlora_kit").setLevel(logging.INFO)


def _train(args: argparse.Namespace) -> None:
    from qlora_kit.config import load_recipe
    from qlora_kit.pipelines.advice import training_kept, training_levers
    from qlora_kit.pipelines.train import train

    recipe = load_recipe(args.recipe, args.overrides, check_files=True)
    with explain_resources("training", lambda: training_levers(recipe), lambda: training_kept(recipe)):
        train(recipe)


def _merge(args: argparse.Namespace) -> None:
    import signal

    from qlora_kit.pipelines.advice import merge_kept, merge_levers
    from qlora_kit.pipelines.evaluate import format_report
    from qlora_kit.pipelines.merge import MergeOptions, merge

    # `kill` then unwinds like Ctrl-C, deleting the partially written output directory.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    options = {k: v for k, v in vars(args).items() if k not in ("command", "run", "no_eval")}
    options = MergeOptions(**options, evaluate=not args.no_eval)
    with explain_resources("merging", lambda: merge_levers(options), lambda: merge_kept(options)):
        print(format_report(merge(options)))


def _chat(args: argparse.Namespace) -> None:
    from qlora_kit.pipelines.chat import ChatOptions, chat

    chat(ChatOptions(**{k: v for k, v in vars(args).items() if k not in ("command", "run")}))


def build_parser() -> argparse.ArgumentParser:
    from qlora_kit.quant.gguf_mix import FILE_TYPES

    gguf_types = tuple(FILE_TYPES)
    parser = argparse.ArgumentParser(prog="qlora-kit", description="QLoRA fine-tuning on NF4 bases.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune LoRA adapters as a recipe says")
    train.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. lora.r=8")
    train.set_defaults(run=_train)

    merge = commands.add_parser("merge", help="merge adapters into the base; optionally re-quantize (docs/merge.md)")
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a trained adapter, e.g. outputs/quickstart")
    merge.add_argument("--out", required=True, help="output directory (written as DIR.partial-<pid>, then renamed)")
    merge.add_argument(
        "--quantize",
        choices=("none", "gptq", "awq", "rtn", "gguf"),
        default="none",
        help="checkpoint to write: merged bf16 (none), GPTQ v1, AWQ gemm, RTN in the GPTQ v1 layout, "
        "or a GGUF file for llama.cpp / Ollama (--gguf-type)",
    )
    merge.add_argument(
        "--gguf-type",
        choices=gguf_types,
        help="--quantize gguf: the file type (llama.cpp's mixture for the _m/_s types)",
    )
    merge.add_argument(
        "--imatrix",
        action="store_true",
        help="--quantize gguf: weight the rounding error by each input column's mean x² on the calibration data",
    )
    merge.add_argument("--bits", type=int, default=4)
    merge.add_argument("--group-size", type=int, default=128, help="-1 for one group per row")
    merge.add_argument(
        "--sym",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="symmetric GPTQ/RTN grid (AWQ is always asymmetric)",
    )
    merge.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    merge.add_argument(
        "--damp-percent",
        type=float,
        default=0.1,
        help="GPTQ Hessian damping, times the diagonal's mean (docs/merge.md: why not 0.01)",
    )
    merge.add_argument(
        "--merge-into",
        choices=("nf4", "original"),
        default="nf4",
        help="add the adapters to the dequantized NF4 weights (what training saw) or to the originals",
    )
    merge.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    merge.add_argument(
        "--calibration",
        metavar="PATH",
        help=".txt/.jsonl/... file or dataset (default: the training data named in recipe.yaml)",
    )
    merge.add_argument("--calibration-samples", type=int, default=128)
    merge.add_argument("--calibration-seq-len", type=int, default=2048)
    merge.add_argument(
        "--report", action="store_true", help="also build and evaluate merged bf16, RTN, GPTQ and AWQ in memory"
    )
    merge.add_argument("--no-eval", action="store_true", help="skip perplexity / accuracy")
    merge.add_argument(
        "--eval-text",
        default=None,
        help="held-out text for perplexity (default: the repository's examples/heldout/essays.txt)",
    )
    merge.add_argument("--test-examples", type=int, help="at most this many test examples for exact match")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    merge.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    merge.set_defaults(run=_merge)

    chat = commands.add_parser("chat", help="chat with an adapter, a merged/GPTQ/AWQ checkpoint or a .gguf file")
    chat.add_argument("path", metavar="PATH", help="an adapter directory, a checkpoint directory, or a .gguf file")
    chat.add_argument("--prompt", help="answer this one message and exit (default: interactive)")
    chat.add_argument("--system", help="a system message at the start of the conversation")
    chat.add_argument("--max-new-tokens", type=int, default=512, help="at most this many tokens per answer")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy")
    chat.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available; not for .gguf)")
    chat.set_defaults(run=_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``qlora-kit`` and ``train.py``; a failure the user caused exits with status 2 and one line."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    return run_command(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
