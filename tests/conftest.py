"""Session-wide fixtures: the demo model (converted once, shared by every test that needs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.model_files import default_demo_dir, ensure_demo_model


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (`spindle model demo`; idempotent)."""
    return ensure_demo_model(default_demo_dir())
