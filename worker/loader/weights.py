"""Reading a checkpoint's tensors lazily, by their Hugging Face names.

`iter_weights(files)` yields `(name, LazyTensor)` for every tensor in every safetensors file of a
model. A `LazyTensor` reads nothing until asked: `tensor[rows, cols]` reads only that slice from
disk, so a tensor-parallel rank can load just its shard; `tensor.load()` reads it whole. Nothing
is skipped or renamed here; the model's weight loaders decide what to use or ignore.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from common.model_files import SAFETENSORS_INDEX, ModelFiles, ModelFilesError

# safetensors' dtype codes -> torch dtypes (the float8 and unsigned ones exist in recent torch).
_DTYPES: dict[str, torch.dtype] = {
    code: dtype
    for code, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }.items()
    if dtype is not None
}


class LazyTensor:
    """One tensor of a safetensors file, read on demand (onto the CPU)."""

    def __init__(self, handle: Any, name: str, file: Path) -> None:
        self._handle = handle  # keeps the file's memory map open while this tensor lives
        self._slice = handle.get_slice(name)
        self.name = name
        self.file = file
        self.shape: tuple[int, ...] = tuple(self._slice.get_shape())
        code = self._slice.get_dtype()
        if code not in _DTYPES:
            raise ValueError(f"{file.name}: tensor {name} has dtype {code}, which torch lacks")
        self.dtype: torch.dtype = _DTYPES[code]

    def __getitem__(self, index: Any) -> torch.Tensor:
        """Read only `index` (ints, slices, `...`) of the tensor."""
        return self._slice[index]

    def load(self) -> torch.Tensor:
        return self._handle.get_tensor(self.name)

    def __repr__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"LazyTensor({self.name!r}, shape={self.shape}, dtype={dtype}, file={self.file.name!r})"
        )


def iter_weights(files: ModelFiles) -> Iterator[tuple[str, LazyTensor]]:
    """Every tensor of the checkpoint, file by file, each file opened once. Raises when the
    shard index names a tensor its file lacks, or when two files hold the same name."""
    expected = _index_weight_map(files.root)
    seen: dict[str, Path] = {}
    for path in files.weight_files:
        handle = safe_open(path, framework="pt", device="cpu")
        names = list(handle.keys())
        _check_index_entries(expected, path.relative_to(files.root).as_posix(), set(names))
        for name in names:
            if name in seen:
                raise ModelFilesError(f"tensor {name} is in both {seen[name].name} and {path.name}")
            seen[name] = path
            yield name, LazyTensor(handle, name, path)


def _index_weight_map(root: Path) -> dict[str, str]:
    index_path = root / SAFETENSORS_INDEX
    if not index_path.is_file():
        return {}
    return json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})


def _check_index_entries(weight_map: dict[str, str], file_name: str, names: set[str]) -> None:
    promised = {name for name, file in weight_map.items() if file == file_name}
    missing = sorted(promised - names)
    if missing:
        raise ModelFilesError(
            f"{SAFETENSORS_INDEX} places {len(missing)} tensors in {file_name} that it does not "
            f"hold, e.g. {', '.join(missing[:3])}"
        )
