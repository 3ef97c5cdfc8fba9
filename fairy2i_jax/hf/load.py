"""``load_pretrained``: a HF checkpoint (local dir, ``.gguf`` file or hub id) -> a real :class:`CausalLM`.

Steps: read ``config.json`` (:mod:`fairy2i_jax.hf.config_map`), build the model abstractly (``nnx.eval_shape``:
nothing allocated), check the checkpoint's tensor names and shapes against the model (one
:class:`CheckpointError` listing every missing, unexpected and mis-shaped tensor), then create each param with
``jax.make_array_from_callback(shape, target NamedSharding, read_slice)``: every device shard reads only its own
slice of one tensor from disk, so the model is never gathered on one host. Scanned layer params fill their
leading ``layers`` axis from the per-layer tensors. Values are cast to the param dtype on the host.

A directory exported in the ``packed`` format (``quantization_config.quant_method == "fairy2i"``) loads through
:class:`~fairy2i_jax.hf.packed.PackedSource`: its phase-quantized linears are decoded from the 2-bit codes into
their real ``A_q``, so the result is a real model with the logits of the trained QAT model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from fairy2i_jax.convert import model_variables
from fairy2i_jax.hf.config_map import config_from_hf
from fairy2i_jax.hf.keymap import hf_names, is_ignored
from fairy2i_jax.hf.packed import PackedSource, read_quantization_config
from fairy2i_jax.hf.safetensors_io import CheckpointError, SafetensorsCheckpoint
from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.models.linear import LinearSpec
from fairy2i_jax.models.llama import CausalLM, abstract_model
from fairy2i_jax.sharding import variable_sharding

logger = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
PACKED_LOADING = ("kernels", "decode")  # how load_pretrained reads a packed export


class TensorSource(Protocol):
    """What the loader needs from a checkpoint: names, shapes and slice reads (numpy)."""

    def keys(self): ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray: ...


class MappingSource:
    """A :class:`TensorSource` over a mapping name -> numpy array (GGUF tensors, in-memory state dicts).

    Lazily computed arrays (GGUF dequantization) are cached for one name at a time.
    """

    def __init__(self, tensors, shape_of: Callable[[str], tuple[int, ...]] | None = None):
        self._tensors = tensors
        self._shape_of = shape_of
        self._cached: tuple[str, np.ndarray] | None = None

    def keys(self):
        return self._tensors.keys()

    def _get(self, name: str) -> np.ndarray:
        if self._cached is None or self._cached[0] != name:
            self._cached = (name, np.asarray(self._tensors[name]))
        return self._cached[1]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shape_of(name)) if self._shape_of else tuple(self._get(name).shape)

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        return self._get(name)[index]


def _offline() -> bool:
    flags = (os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag in ("1", "true", "yes", "on") for flag in flags)


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """The local path of a checkpoint: an existing dir or ``.gguf`` file, else a hub snapshot (online only)."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_hub_id)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointError(f"checkpoint {text!r} does not exist (neither a local directory/file nor a hub id)")
    if _offline():
        raise CheckpointError(
            f"checkpoint {text!r} does not exist locally and HF offline mode is on (HF_HUB_OFFLINE / "
            "TRANSFORMERS_OFFLINE), so it is not downloaded"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))


def read_hf_config(directory: Path) -> dict:
    """The ``config.json`` dict of a HF checkpoint directory (clear errors when missing or invalid)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (a HF checkpoint directory needs one)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON: {e}") from e


def open_checkpoint(path: Path, packed: str = "decode") -> tuple[dict, TensorSource, dict[str, LinearSpec]]:
    """``(HF config dict, tensor source, linear plan)`` of a HF directory or a ``.gguf`` file. A packed export
    (:mod:`fairy2i_jax.hf.packed`) gives, with ``packed="kernels"``, its codes as they are and the plan that
    makes its quantized modules ``packed`` linears; with ``packed="decode"`` its ``weight`` tensors decoded to
    ``A_q`` (an ordinary real model). Every other checkpoint: its tensors and an empty (all real) plan."""
    if packed not in PACKED_LOADING:
        raise ValueError(f"packed must be one of {PACKED_LOADING}, got {packed!r}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: a checkpoint file must be .gguf; otherwise pass the HF directory")
        from fairy2i_jax.hf.gguf import load_gguf

        checkpoint = load_gguf(path)
        return dict(checkpoint.config), MappingSource(checkpoint.tensors, checkpoint.tensors.shape), {}
    hf = read_hf_config(path)
    checkpoint = SafetensorsCheckpoint(path)
    packed_modules = read_quantization_config(hf, str(path))
    if packed_modules is None:
        return hf, checkpoint, {}
    decoded = PackedSource(checkpoint, packed_modules, str(path))  # checks every packed tensor's shape and dtype
    if packed == "decode":
        return hf, decoded, {}
    return hf, checkpoint, {name: LinearSpec("packed", spec) for name, (_, _, spec) in packed_modules.items()}


def check_tensors(model: CausalLM, source: TensorSource, where: str) -> dict[tuple, list[str]]:
    """The HF names of every param (by path); raises one :class:`CheckpointError` listing every missing,
    unexpected and mis-shaped tensor."""
    cfg = model.config
    names_by_path, expected = {}, {}
    for path, var in model_variables(model).items():
        names = hf_names(path, cfg.scan_layers, cfg.num_layers)
        shape = tuple(var.get_value().shape[1:] if cfg.scan_layers and path[0] == "layers" else var.get_value().shape)
        names_by_path[path] = names
        expected.update({n: shape for n in names})
    available = set(source.keys())
    missing = sorted(n for n in expected if n not in available)
    misshaped = sorted(
        f"{n}: found {list(source.shape(n))}, expected {list(s)}"
        for n, s in expected.items()
        if n in available and tuple(source.shape(n)) != s
    )
    extra = sorted(available - set(expected))
    ignored = [n for n in extra if is_ignored(n) or (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if ignored:
        logger.info("%s: ignoring %s (buffers, or lm_head.weight of a tied model)", where, ignored)
    unexpected = [n for n in extra if n not in ignored]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): " + ", ".join(f"{n} {list(expected[n])}" for n in missing))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected))
    if misshaped:
        problems.append(f"mis-shaped tensors ({len(misshaped)}): " + "; ".join(misshaped))
    if problems:
        header = f"{where}: checkpoint does not match the {cfg.model_type} model of its config.json:"
        raise CheckpointError("\n  ".join([header, *problems]))
    return names_by_path


def _reader(source: TensorSource, names: list[str], stacked: bool, dtype: np.dtype):
    """``index -> numpy slice`` for ``jax.make_array_from_callback`` (stacked: dim 0 selects per-layer tensors)."""

    def one(name: str, idx: tuple[slice, ...]) -> np.ndarray:
        array = source.read(name, idx)
        # (numpy's issubdtype does not know bfloat16; jax's does)
        if jnp.issubdtype(dtype, jnp.floating) and not jnp.issubdtype(array.dtype, jnp.floating):
            raise CheckpointError(f"tensor {name!r} is stored as {array.dtype}, not a floating-point type: a weight "
                                  "is never cast from integers (a quantized or corrupt checkpoint?)")
        if jnp.issubdtype(dtype, jnp.unsignedinteger) and array.dtype != dtype:
            raise CheckpointError(f"tensor {name!r} is stored as {array.dtype}, expected {np.dtype(dtype)} codes")
        return array.astype(dtype)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return one(names[0], tuple(index))
        layers = range(*index[0].indices(len(names)))
        return np.stack([one(names[i], tuple(index[1:])) for i in layers])

    return read


def fill_from_source(model: CausalLM, source: TensorSource, mesh: Mesh | None = None, where: str = "checkpoint",
                     progress: bool = False):
    """Create every param of (abstract) ``model`` from ``source`` in its target sharding, in place; returns it."""
    from tqdm.auto import tqdm

    cfg = model.config
    names_by_path = check_tensors(model, source, where)
    single = SingleDeviceSharding(jax.devices()[0])
    variables = model_variables(model)
    for path, var in tqdm(variables.items(), total=len(variables), desc="load weights", unit="tensor",
                          disable=not progress):
        value = var.get_value()
        sharding = single if mesh is None else variable_sharding(var, mesh)
        stacked = cfg.scan_layers and path[0] == "layers"
        read = _reader(source, names_by_path[path], stacked, np.dtype(value.dtype))
        var.set_value(jax.make_array_from_callback(tuple(value.shape), sharding, read))
    return model


def load_pretrained(
    path_or_hub_id: str | os.PathLike,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
    scan_layers: bool = False,
    remat: str = "none",
    progress: bool = False,
    packed: str = "kernels",
) -> CausalLM:
    """Load a HF Llama-family checkpoint as a :class:`CausalLM` (real, or with ``packed`` linears for a packed
    export).

    ``path_or_hub_id``: a local HF directory (``config.json`` + safetensors), a ``.gguf`` file, or a hub id
    (downloaded with ``huggingface_hub.snapshot_download`` only when no such local path exists and offline mode
    is off). ``dtype``: param dtype; ``compute_dtype``: activation dtype (``None`` = bfloat16, the
    ``ModelConfig`` default); ``mesh``: params are created directly in their sharding on it (default: one
    device); ``scan_layers`` / ``remat``: layer layout and rematerialisation policy; ``progress``: a progress bar;
    ``packed``: for a packed export, ``"kernels"`` (default: its quantized linears keep their 2-bit codes and
    multiply through :mod:`fairy2i_jax.kernels`) or ``"decode"`` (codes decoded to real ``A_q`` weights).
    Raises :class:`CheckpointError` for missing / corrupt / pickled / mismatching checkpoints and ``ValueError``
    for an unsupported architecture.
    """
    path = resolve_checkpoint(path_or_hub_id)
    hf, source, plan = open_checkpoint(path, packed)
    kwargs = dict(param_dtype=dtype, scan_layers=scan_layers, remat=remat)
    if compute_dtype is not None:
        kwargs["compute_dtype"] = compute_dtype
    try:
        cfg: ModelConfig = config_from_hf(hf, **kwargs)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    model = abstract_model(cfg, plan)
    return fill_from_source(model, source, mesh, where=str(path), progress=progress)
