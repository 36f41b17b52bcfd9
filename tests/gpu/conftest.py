"""GPU tests reuse the tiny random models of the CPU model tests."""

from tests.model.conftest import tiny_models  # noqa: F401  (a fixture, registered by import)
