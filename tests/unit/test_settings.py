"""common/settings.py: flags, their SPINDLE_ environment twins, precedence and errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from common.settings import env_name, flag_name, load_settings, setting, settings_parser
from gateway.settings import GatewaySettings


@dataclass(frozen=True)
class Example:
    """an example process"""

    name: str = setting("demo", "a name")
    port: int = setting(8000, "a port")
    ratio: float = setting(0.5, "a ratio")
    verbose: bool = setting(False, "talk more")
    token: str | None = setting(None, "optional secret")
    dtype: Literal["auto", "float32", "bfloat16"] = setting("auto", "a choice")
    sizes: tuple[int, ...] = setting((1, 2), "several numbers")
    folder: Path = setting(Path("."), "a path")

    def __post_init__(self) -> None:
        if self.port < 1:
            raise ValueError(f"--port must be >= 1, got {self.port}")


def test_defaults_without_flags_or_environment() -> None:
    assert load_settings(Example, [], environ={}) == Example()


def test_flags_set_every_kind_of_field() -> None:
    argv = ["--name", "x", "--port", "9", "--ratio", "0.25", "--verbose", "--token", "s3",
            "--dtype", "bfloat16", "--sizes", "4", "5", "6", "--folder", "/tmp/m"]  # fmt: skip
    settings = load_settings(Example, argv, environ={})
    assert settings == Example("x", 9, 0.25, True, "s3", "bfloat16", (4, 5, 6), Path("/tmp/m"))


def test_environment_twins_are_used_when_the_flag_is_absent() -> None:
    environ = {"SPINDLE_PORT": "7", "SPINDLE_VERBOSE": "yes", "SPINDLE_SIZES": "3, 4",
               "SPINDLE_TOKEN": "abc", "SPINDLE_DTYPE": "float32"}  # fmt: skip
    settings = load_settings(Example, [], environ=environ)
    assert (settings.port, settings.verbose, settings.sizes) == (7, True, (3, 4))
    assert (settings.token, settings.dtype) == ("abc", "float32")


def test_flag_beats_environment() -> None:
    settings = load_settings(
        Example,
        ["--port", "1", "--no-verbose"],
        environ={"SPINDLE_PORT": "2", "SPINDLE_VERBOSE": "1"},
    )
    assert (settings.port, settings.verbose) == (1, False)


def test_empty_environment_value_means_none_for_optional_fields() -> None:
    assert load_settings(Example, [], environ={"SPINDLE_TOKEN": ""}).token is None


def test_environment_is_read_when_loading_not_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINDLE_NAME", "late")
    assert load_settings(Example, []).name == "late"
    monkeypatch.setenv("SPINDLE_NAME", "later")
    assert load_settings(Example, []).name == "later"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"SPINDLE_PORT": "eighty"}, "SPINDLE_PORT='eighty' is not valid"),
        ({"SPINDLE_VERBOSE": "maybe"}, "SPINDLE_VERBOSE='maybe' is not valid"),
        ({"SPINDLE_DTYPE": "int4"}, "SPINDLE_DTYPE='int4' is not valid"),
        ({"SPINDLE_PORT": "0"}, "--port must be >= 1, got 0"),
    ],
)
def test_bad_values_exit_with_a_message_naming_the_variable(
    environ: dict[str, str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        load_settings(Example, [], environ=environ)
    assert expected in capsys.readouterr().err


def test_bad_flag_value_exits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_settings(Example, ["--dtype", "int4"], environ={})
    assert "invalid choice" in capsys.readouterr().err


def test_settings_are_frozen() -> None:
    settings = load_settings(Example, [], environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_mutable_defaults_are_refused() -> None:
    with pytest.raises(TypeError):
        setting([1], "a list")


def test_names_and_help() -> None:
    assert (env_name("max_queue"), flag_name("max_queue")) == ("SPINDLE_MAX_QUEUE", "--max-queue")
    help_text = settings_parser(GatewaySettings).format_help()
    for flag, env in [("--max-queue", "SPINDLE_MAX_QUEUE"), ("--redis-url", "SPINDLE_REDIS_URL"),
                      ("--max-concurrent-requests", "SPINDLE_MAX_CONCURRENT_REQUESTS"),
                      ("--api-key", "SPINDLE_API_KEY"), ("--request-timeout", "SPINDLE_REQUEST_TIMEOUT")]:  # fmt: skip
        assert flag in help_text and env in help_text


def test_gateway_settings_defaults_and_twins() -> None:
    settings = load_settings(GatewaySettings, [], environ={"SPINDLE_MAX_QUEUE": "3"})
    assert settings.max_queue == 3
    assert (settings.port, settings.prefix, settings.max_concurrent_requests) == (
        8000,
        "spindle",
        512,
    )
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.api_key is None


def test_gateway_settings_refuse_zero_limits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_settings(GatewaySettings, ["--max-queue", "0"], environ={})
    assert "--max-queue must be >= 1, got 0" in capsys.readouterr().err
