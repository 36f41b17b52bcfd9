"""`configure_logging`: spindle's loggers at the chosen level, the libraries' never below INFO."""

from __future__ import annotations

import logging

import pytest

from common.logs import configure_logging, library_level


@pytest.fixture
def restore_levels():
    loggers = [logging.getLogger(), logging.getLogger("spindle")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def test_debug_reaches_spindle_loggers_but_not_the_libraries(restore_levels):
    configure_logging("debug")
    assert logging.getLogger("spindle.worker").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("spindle.gateway").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("sse_starlette.sse").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("sse_starlette.sse").isEnabledFor(logging.INFO)


def test_quieter_levels_apply_to_everyone(restore_levels):
    configure_logging("WARNING")
    for name in ("spindle.worker", "sse_starlette.sse", "redis"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)


def test_library_level():
    assert [library_level(x) for x in ("debug", "INFO", "warning", "ERROR")] == [
        "INFO",
        "INFO",
        "WARNING",
        "ERROR",
    ]
