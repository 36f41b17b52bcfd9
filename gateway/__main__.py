"""`python -m gateway`: serve the gateway with uvicorn (flags: `python -m gateway --help`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import uvicorn

from common.settings import load_settings
from gateway.app import create_app
from gateway.settings import GatewaySettings


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(GatewaySettings, argv, prog="python -m gateway")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
