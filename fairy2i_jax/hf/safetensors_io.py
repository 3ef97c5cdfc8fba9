"""Reading and writing HF safetensors checkpoints one tensor (slice) at a time, with clear refusals.

Reading. A directory holds either ``model.safetensors`` or shards listed in ``model.safetensors.index.json``
(``{"weight_map": {tensor name: file name}}``). Every file is opened with ``safetensors.safe_open(path,
framework="numpy")``, which validates the header (length, JSON, dtypes, offsets, the data area covered);
any failure becomes one :class:`CheckpointError` naming the file and the library's reason. Slices are read
with ``get_slice(name)[index]``, which reads only the requested bytes; BF16 tensors come back as
``ml_dtypes.bfloat16`` because ``ml_dtypes`` is imported here (safetensors' numpy framework looks the dtype up
by name). Scalars and empty tensors, which ``get_slice`` cannot index, are read whole.

Writing (:func:`write_sharded`): tensors are described up front by :class:`TensorPlan` (name, shape, dtype and
a ``produce()`` callable) and split into shards of at most ``max_shard_bytes`` by ``huggingface_hub``'s
``split_state_dict_into_shards_factory`` (HF's own rule and file names, ``model-0000k-of-0000N.safetensors``;
it needs only sizes, so nothing is computed yet). Each file is then written by hand, header first and one
tensor at a time as it is produced, so at most one tensor is in host memory: the safetensors library writes
only whole dicts, which is why this writer exists. The header carries ``__metadata__`` (``{"format": "pt"}`` by
default, what transformers expects) and is padded with spaces to a multiple of 8 bytes.

Pickled weights (``pytorch_model.bin``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are never loaded: a
directory with only those raises :class:`CheckpointError` asking for safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors then reads BF16 as numpy arrays)
import numpy as np
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import SafetensorError, safe_open

from fairy2i_jax.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model{suffix}.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "U8": np.dtype(np.uint8),
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_SHARD_BYTES = 5_000_000_000  # HF's default max_shard_size, "5GB"
__all__ = ["CheckpointError", "SafetensorsCheckpoint", "TensorPlan", "read_header", "shard_plan", "write_sharded"]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: its ``file``, safetensors ``dtype`` name and ``shape``."""

    file: str
    dtype: str
    shape: tuple[int, ...]


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors of the safetensors file at ``path`` (validated by the library); :class:`CheckpointError` naming
    the file for a corrupt or truncated file or an unsupported dtype."""
    path = str(path)
    try:
        with safe_open(path, framework="numpy") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            infos = {name: TensorInfo(path, s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    for name, info in infos.items():
        if info.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info.dtype}; supported: "
                                  f"{', '.join(SAFETENSORS_DTYPES)}")
    return infos


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory}: only pickled weights found ({', '.join(pickles)}); pickled checkpoints are never "
            "loaded (unpickling can run arbitrary code). Convert them to safetensors, e.g. with transformers: "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE} found")


class SafetensorsCheckpoint:
    """All tensors of a HF checkpoint directory, readable slice by slice (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if index_path.is_file():
            files = self._files_from_index(index_path)
        elif (self.directory / SINGLE_FILE).is_file():
            files = {SINGLE_FILE: None}
        else:
            _refuse_pickles(self.directory)
        self.tensors: dict[str, TensorInfo] = {}
        for file_name, expected in files.items():
            header = read_header(self.directory / file_name)
            absent = sorted((expected or set()) - set(header))
            if absent:
                raise CheckpointError(
                    f"{self.directory / file_name}: tensors listed for it in {INDEX_FILE} are absent: {absent}")
            self.tensors.update(header)
        self._handles: dict[str, Any] = {}

    def _files_from_index(self, index_path: Path) -> dict[str, set[str]]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files: dict[str, set[str]] = {}
            for name, file_name in weight_map.items():
                files.setdefault(file_name, set()).add(name)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index (needs a 'weight_map'): {e}") from e
        missing = sorted(f for f in files if not (self.directory / f).is_file())
        if missing:
            raise CheckpointError(f"{index_path}: shard file(s) {missing} listed in the index do not exist")
        return files

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dtype(self, name: str) -> np.dtype:
        return SAFETENSORS_DTYPES[self.tensors[name].dtype]

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """``tensor[index]`` as a numpy array in the file's dtype, reading only the bytes the slice needs."""
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(info.file, framework="numpy")
        try:
            if not info.shape or math.prod(info.shape) == 0:  # get_slice cannot index these
                return np.asarray(handle.get_tensor(name))[tuple(index)]
            return np.asarray(handle.get_slice(name)[tuple(index) or (slice(None),)])
        except SafetensorError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} {info.dtype}{list(info.shape)}: "
                                  f"{e}") from None

    def close(self) -> None:
        self._handles.clear()


# ---------------------------------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: HF ``name``, ``shape``, ``dtype``, and ``produce()`` -> its numpy array (called once,
    when the tensor is written)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        """``prod(shape) * itemsize``."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def shard_plan(tensors: Sequence[TensorPlan], max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, list[TensorPlan]]:
    """``{file name: tensors}``: ``tensors`` split by HF's rule into shards of at most ``max_shard_bytes`` (a tensor
    larger than the limit gets a shard of its own); one shard is ``model.safetensors``. Duplicate names and
    dtypes without a safetensors name raise ``ValueError``."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    by_name: dict[str, TensorPlan] = {}
    for t in tensors:
        if t.name in by_name:
            raise ValueError(f"tensor {t.name!r} planned twice")
        if np.dtype(t.dtype) not in DTYPE_NAMES:
            raise ValueError(f"tensor {t.name!r}: dtype {np.dtype(t.dtype)} has no safetensors name")
        by_name[t.name] = t
    split = split_state_dict_into_shards_factory(by_name, get_storage_size=lambda t: t.nbytes,
                                                 filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_bytes)
    return {file: [by_name[n] for n in names] for file, names in split.filename_to_tensors.items()}


def _header_bytes(tensors: Sequence[TensorPlan], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(path: str | os.PathLike, tensors: Sequence[TensorPlan],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write one safetensors file: the header, then each tensor's bytes as ``produce()`` returns them (each is
    checked against its planned shape and dtype: ``ValueError`` naming the tensor)."""
    header = _header_bytes(tensors, metadata or {"format": "pt"})
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for t in tensors:
            array = np.asarray(t.produce())
            if tuple(array.shape) != tuple(t.shape) or array.dtype != np.dtype(t.dtype):
                raise ValueError(f"tensor {t.name!r}: produced {array.dtype}{list(array.shape)}, planned "
                                 f"{np.dtype(t.dtype)}{list(t.shape)}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)


def write_sharded(directory: str | os.PathLike, tensors: Sequence[TensorPlan],
                  max_shard_bytes: int = MAX_SHARD_BYTES, metadata: Mapping[str, str] | None = None,
                  on_tensor: Callable[[TensorPlan], None] | None = None) -> list[str]:
    """Write ``tensors`` into ``directory`` as HF safetensors shards (+ index when more than one); returns the
    file names. ``on_tensor(t)`` is called after each tensor is produced (progress bars)."""
    directory = Path(directory)
    shards = shard_plan(tensors, max_shard_bytes)
    for file_name, shard in shards.items():
        planned = shard if on_tensor is None else [dataclasses.replace(t, produce=_reporting(t, on_tensor))
                                                  for t in shard]
        write_safetensors(directory / file_name, planned, metadata)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: file_name for file_name, shard in shards.items() for t in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return list(shards)


def _reporting(t: TensorPlan, on_tensor: Callable[[TensorPlan], None]) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        array = t.produce()
        on_tensor(t)
        return array

    return produce
