"""ruff (lint and format) over the project and mypy over common/, worker/, gateway/ and bench/
(STYLE.md rule 10): run as tests so the one CI command enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["common", "worker", "gateway", "tests", "bench"]


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    result = run("ruff", "check", *PACKAGES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = run("ruff", "format", "--check", *PACKAGES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean_on_every_package():
    result = run("mypy", "common", "worker", "gateway", "bench")
    assert result.returncode == 0, result.stdout + result.stderr
