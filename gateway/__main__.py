"""`python -m gateway`: serve the gateway with uvicorn (flags: `python -m gateway --help`)."""

from __future__ import annotations

from collections.abc import Sequence

import uvicorn

from common.logs import configure_logging, library_level
from common.settings import load_settings
from gateway.app import create_app
from gateway.settings import GatewaySettings


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(GatewaySettings, argv, prog="python -m gateway")
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=library_level(settings.log_level).lower(),
        access_log=settings.access_log,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
