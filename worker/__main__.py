"""`python -m worker --model DIR ...`: one worker process serving one model from Redis."""

from __future__ import annotations

import logging
import sys

from common.logs import configure_logging
from common.settings import load_settings
from worker.service import WorkerService
from worker.settings import WorkerSettings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(WorkerSettings, argv, prog="python -m worker")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.log_file is not None:
        handlers.append(logging.FileHandler(settings.log_file))
    configure_logging(settings.log_level, handlers)
    WorkerService.start(settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
