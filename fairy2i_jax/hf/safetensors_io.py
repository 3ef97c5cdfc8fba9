"""Reading and writing HF safetensors checkpoints one tensor (slice) at a time, with validation and clear refusals.

A directory holds either ``model.safetensors`` or shards listed in ``model.safetensors.index.json``
(``{"weight_map": {tensor name: file name}}``). Every file's header is validated before use: the 8-byte
little-endian header length must fit the file, the header must be a JSON object, each tensor entry needs a
supported ``dtype``, a ``shape`` and ``data_offsets [begin, end]`` with ``end - begin = prod(shape) * itemsize``
and ``end`` inside the data area. Any failure raises :class:`CheckpointError` naming the file (and tensor).

Slices are read with ``safetensors.safe_open(path, framework="numpy").get_slice(name)[index]``, which reads
only the requested bytes. BF16 is the exception: safetensors 0.8's numpy framework raises ``TypeError: data
type 'bfloat16' not understood`` for BF16 tensors, so BF16 tensors are read through a read-only ``np.memmap`` of
their byte range (offsets from the validated header), viewed as ``ml_dtypes.bfloat16``; indexing the memmap
also reads only the requested bytes.

Writing (:func:`write_sharded`): tensors are described up front by :class:`TensorPlan` (name, shape, dtype and
a ``produce()`` callable), split greedily into shards of at most ``max_shard_bytes`` (HF's ``max_shard_size``,
5 GB by default), and each file is written header first, then one tensor at a time as it is produced, so at
most one tensor is in host memory. One shard is ``model.safetensors``; more are
``model-0000k-of-0000N.safetensors`` plus ``model.safetensors.index.json``. The header carries ``__metadata__``
(``{"format": "pt"}`` by default, what transformers expects) and is padded with spaces to a multiple of 8 bytes.

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

import ml_dtypes
import numpy as np
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
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
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, pickled, or not matching the model."""


class TensorInfo:
    """Where one tensor lives: ``file``, safetensors ``dtype`` name, ``shape``, absolute byte ``offset``."""

    __slots__ = ("file", "dtype", "shape", "offset")

    def __init__(self, file: str, dtype: str, shape: tuple[int, ...], offset: int):
        self.file, self.dtype, self.shape, self.offset = file, dtype, shape, offset


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Validate the safetensors file at ``path`` and return its tensors (``__metadata__`` excluded)."""
    path = str(path)
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, the header length alone needs 8)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file: header length {header_len} exceeds the "
                f"{size - 8} bytes after the length field"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON object is expected)")
    data_start = 8 + header_len
    data_size = size - data_start
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}")
        dtype, shape, offsets = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(SAFETENSORS_DTYPES)}"
            )
        begin, end = offsets
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file: tensor {name!r} {dtype}{list(shape)} has data "
                f"offsets [{begin}, {end}] but needs {nbytes} bytes inside a data area of {data_size} bytes"
            )
        tensors[name] = TensorInfo(path, dtype, shape, data_start + begin)
    return tensors


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
        single = self.directory / SINGLE_FILE
        if index_path.is_file():
            files = self._files_from_index(index_path)
        elif single.is_file():
            files = {SINGLE_FILE: None}
        else:
            _refuse_pickles(self.directory)
        self.tensors: dict[str, TensorInfo] = {}
        for file_name, expected in files.items():
            header = read_header(self.directory / file_name)
            if expected is not None:
                absent = sorted(expected - set(header))
                if absent:
                    raise CheckpointError(
                        f"{self.directory / file_name}: tensors listed for it in {INDEX_FILE} are absent: {absent}"
                    )
            self.tensors.update(header)
        self._handles: dict[str, Any] = {}

    def _files_from_index(self, index_path: Path) -> dict[str, set[str]]:
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files: dict[str, set[str]] = {}
        for name, file_name in weight_map.items():
            files.setdefault(file_name, set()).add(name)
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
        if not index:
            index = tuple(slice(None) for _ in info.shape)
        if math.prod(info.shape) == 0:  # safetensors cannot slice an empty tensor
            return np.zeros(info.shape, SAFETENSORS_DTYPES[info.dtype])[index]
        if info.dtype == "BF16":
            view = np.memmap(info.file, dtype=SAFETENSORS_DTYPES["BF16"], mode="r", offset=info.offset,
                             shape=info.shape)
            return np.array(view[index])
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(info.file, framework="numpy")
        if not info.shape:
            return handle.get_tensor(name)
        return np.asarray(handle.get_slice(name)[index])

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


def shard_plan(tensors: Sequence[TensorPlan], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[TensorPlan]]:
    """Split ``tensors`` in order into shards of at most ``max_shard_bytes`` (greedy: a tensor opens a new shard
    when it would not fit; a tensor larger than the limit gets a shard of its own). Duplicate names raise."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    seen: set[str] = set()
    shards: list[list[TensorPlan]] = []
    size = 0
    for t in tensors:
        if t.name in seen:
            raise ValueError(f"tensor {t.name!r} planned twice")
        if np.dtype(t.dtype) not in DTYPE_NAMES:
            raise ValueError(f"tensor {t.name!r}: dtype {np.dtype(t.dtype)} has no safetensors name")
        seen.add(t.name)
        if not shards or size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """``["model.safetensors"]`` for one shard, else ``model-00001-of-0000N.safetensors`` ... (HF's names)."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


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
    names = shard_file_names(len(shards))
    for file_name, shard in zip(names, shards):
        planned = shard if on_tensor is None else [dataclasses.replace(t, produce=_reporting(t, on_tensor))
                                                  for t in shard]
        write_safetensors(directory / file_name, planned, metadata)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: file_name for file_name, shard in zip(names, shards) for t in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _reporting(t: TensorPlan, on_tensor: Callable[[TensorPlan], None]) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        array = t.produce()
        on_tensor(t)
        return array

    return produce
