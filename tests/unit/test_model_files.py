"""Finding model files (common/model_files.py), the dtype names (worker/loader/dtype.py) and
`spindle model demo` on an already converted folder. No model is loaded here."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from common import cli
from common.model_files import (
    HUB_ALLOW_PATTERNS,
    ModelFilesError,
    architecture,
    default_demo_dir,
    ensure_demo_model,
    is_complete_model_folder,
    resolve_model,
)
from worker.loader import dtype as dtype_module
from worker.loader.dtype import cpu_flags, resolve_dtype


def write_config(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config))


def write_tensors(path: Path, names: list[str]) -> None:
    save_file({name: np.full((2, 3), i, dtype=np.float32) for i, name in enumerate(names)}, path)


def write_sharded(folder: Path) -> None:
    write_config(folder)
    weight_map = {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}
    weight_map["c"] = "model-00001-of-00002.safetensors"
    write_tensors(folder / "model-00001-of-00002.safetensors", ["b", "c"])
    write_tensors(folder / "model-00002-of-00002.safetensors", ["a"])
    index = {"metadata": {"total_size": 72}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_path_says_it_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError, match="does not exist"):
        resolve_model(tmp_path / "nowhere" / "model")


def test_relative_missing_path_is_not_sent_to_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(*args: object, **kwargs: object) -> str:
        raise AssertionError("a path was taken for a Hub id")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    with pytest.raises(ModelFilesError, match="does not exist"):
        resolve_model("./no-such-folder")


def test_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 8)
    with pytest.raises(ModelFilesError, match="not a .gguf file"):
        resolve_model(weights)


def test_folder_without_config(tmp_path: Path) -> None:
    write_tensors(tmp_path / "model.safetensors", ["w"])
    with pytest.raises(ModelFilesError, match="has no config.json"):
        resolve_model(tmp_path)


def test_folder_without_safetensors_names_what_it_looked_for(tmp_path: Path) -> None:
    write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelFilesError) as caught:
        resolve_model(tmp_path)
    message = str(caught.value)
    assert "model.safetensors.index.json" in message
    assert "*.safetensors" in message
    assert "pytorch_model.bin" in message


def test_single_file_folder(tmp_path: Path) -> None:
    write_config(tmp_path)
    write_tensors(tmp_path / "model.safetensors", ["w"])
    files = resolve_model(tmp_path)
    assert files.root == tmp_path.resolve()
    assert files.config_path == tmp_path.resolve() / "config.json"
    assert files.weight_files == [tmp_path.resolve() / "model.safetensors"]
    assert files.tokenizer_path is None


def test_sharded_folder_lists_each_shard_once_in_order(tmp_path: Path) -> None:
    write_sharded(tmp_path)
    files = resolve_model(tmp_path)
    assert [p.name for p in files.weight_files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_missing_shard_is_named(tmp_path: Path) -> None:
    write_sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFilesError, match="1 are missing: model-00002-of-00002.safetensors"):
        resolve_model(tmp_path)


def test_tokenizer_files_returns_the_texts_present(tmp_path: Path) -> None:
    write_config(tmp_path)
    write_tensors(tmp_path / "model.safetensors", ["w"])
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 2}')
    files = resolve_model(tmp_path)
    assert files.tokenizer_path == tmp_path.resolve() / "tokenizer.json"
    assert files.tokenizer_files() == {
        "tokenizer.json": '{"model": {}}',
        "chat_template.jinja": "{{ messages }}",
        "generation_config.json": '{"eos_token_id": 2}',
    }


def test_architecture() -> None:
    assert architecture({"architectures": ["Qwen2ForCausalLM", "Other"]}) == "Qwen2ForCausalLM"

    class Config:
        architectures = ["LlamaForCausalLM"]

    assert architecture(Config()) == "LlamaForCausalLM"  # type: ignore[arg-type]
    with pytest.raises(ModelFilesError, match="architectures"):
        architecture({"model_type": "llama"})


def test_hub_failure_says_what_was_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelFilesError) as caught:
        resolve_model("some-org/some-model")
    assert str(caught.value) == (
        "'some-org/some-model' is not a local folder or .gguf file, and downloading it from the "
        "Hugging Face Hub failed: OSError: network is unreachable"
    )


def test_hub_download_fetches_only_what_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path)
    write_tensors(tmp_path / "model.safetensors", ["w"])
    calls: list[tuple[str, dict[str, object]]] = []

    def fake_download(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    files = resolve_model("org/model", revision="v2")
    assert files.root == tmp_path.resolve()
    [(repo_id, kwargs)] = calls
    assert repo_id == "org/model"
    assert kwargs["revision"] == "v2"
    assert kwargs["allow_patterns"] == HUB_ALLOW_PATTERNS
    assert {"config.json", "*.safetensors", "tokenizer.json"} <= set(HUB_ALLOW_PATTERNS)


def test_default_demo_dir_reads_the_environment_when_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPINDLE_DEMO_MODEL", raising=False)
    assert default_demo_dir() == Path.home() / ".cache/spindle/models/SmolLM2-135M-Instruct"
    monkeypatch.setenv("SPINDLE_DEMO_MODEL", str(tmp_path / "demo"))
    assert default_demo_dir() == tmp_path / "demo"


def write_complete_model(folder: Path) -> None:
    write_config(folder)
    write_tensors(folder / "model.safetensors", ["w"])
    (folder / "tokenizer.json").write_text("{}")


def test_ensure_demo_model_keeps_a_complete_folder(tmp_path: Path) -> None:
    write_complete_model(tmp_path)
    before = (tmp_path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(tmp_path) == tmp_path
    assert (tmp_path / "model.safetensors").stat().st_mtime_ns == before


def test_complete_folder_needs_config_tokenizer_and_weights(tmp_path: Path) -> None:
    write_complete_model(tmp_path)
    assert is_complete_model_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    assert not is_complete_model_folder(tmp_path)


def test_gguf_is_converted_once_per_version_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversions: list[Path] = []

    def fake_convert(gguf_path: Path, dest: Path) -> Path:
        conversions.append(dest)
        write_complete_model(dest)
        return dest

    monkeypatch.setattr("common.model_files.convert_gguf", fake_convert)
    weights = tmp_path / "Model-Q4.gguf"
    weights.write_bytes(b"GGUF version 1")
    first = resolve_model(weights, cache_dir=tmp_path / "cache")
    assert resolve_model(weights, cache_dir=tmp_path / "cache").root == first.root
    assert conversions == [first.root]
    assert first.root.parent == (tmp_path / "cache").resolve()
    assert first.root.name.startswith("Model-Q4-")

    weights.write_bytes(b"GGUF version 2, longer")  # a new file under the same name
    second = resolve_model(weights, cache_dir=tmp_path / "cache")
    assert second.root != first.root
    assert conversions == [first.root, second.root]


def test_cli_model_demo_prints_the_folder_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_complete_model(tmp_path)
    assert cli.main(["model", "demo", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path)


def test_cli_model_demo_refuses_a_foreign_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    monkeypatch.setattr("common.model_files.demo_gguf_path", lambda: not_gguf)
    assert cli.main(["model", "demo", str(dest)]) == 1
    assert "is not a complete model folder" in capsys.readouterr().err
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
    ],
)
def test_dtype_names(name: str, expected: torch.dtype) -> None:
    assert resolve_dtype(name, torch.device("cpu")) == expected


def test_bad_dtype_lists_valid_names() -> None:
    with pytest.raises(ValueError) as caught:
        resolve_dtype("float8", torch.device("cpu"))
    message = str(caught.value)
    assert "'float8'" in message
    for name in ("auto", "float32", "bf16", "half"):
        assert name in message


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f"}, torch.float32),
        ({"avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"amx_bf16", "amx_tile"}, torch.bfloat16),
    ],
)
def test_auto_dtype_on_cpu_follows_bf16_flags(
    flags: set[str], expected: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dtype_module, "cpu_flags", lambda: flags)
    assert resolve_dtype("auto", torch.device("cpu")) == expected


def test_cpu_flags_parses_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512_bf16 amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(tmp_path / "absent") is None
