"""Export a :class:`CausalLM` to a Hugging Face directory, in one of three formats.

=================  ======================================================================  =========================
format             each linear's tensors                                                   loads in
=================  ======================================================================  =========================
``dequantized``    ``weight`` = the matrix the model multiplies by: the fake-quantized     vanilla transformers
                   ``A_q`` for ``qat`` layers (the official ``convert_to_inference_mode``   (``AutoModelForCausalLM``),
                   weight), the real master otherwise                                      vLLM, lm-eval, ours
``master``         ``weight`` = the real master (complex masters recomposed), what the     transformers, ours (then
                   official PyTorch code saves: training continues in either codebase       ``convert`` to resume QAT)
``packed``         2-bit codes + scales of every phase-quantized layer                     transformers with
                   (:mod:`fairy2i_jax.hf.packed`), ``weight`` for the others               ``trust_remote_code``,
                                                                                           ours
=================  ======================================================================  =========================

Embeddings, norms and biases are exported as they are, cast to ``dtype`` (default: bfloat16 for ``dequantized``
and ``packed``, where ``bf16_exact`` weights ``A_q`` are exact in bf16, float32 for ``master``, which is
lossless for the trained masters). Complex masters are recomposed with the float64 numpy path of
``from_widely_linear`` (exact, one rounding to ``dtype``). A tied output head (``tie_word_embeddings``) whose
weight is the embedding table stays tied; a quantized tied head (``qat``, the official W2 default) is untied in
``dequantized`` and ``packed`` (``tie_word_embeddings: false`` and its own ``lm_head`` tensors), since its
matrix differs from the (full-precision) embedding table.

``config.json`` is ``config_to_hf`` of the model, plus ``quantization_config`` (packed) or a ``fairy2i`` note
(``{"format", "quantization": {module: spec}}``, dequantized and master) saying how each linear was quantized.
Tokenizer and generation files are copied from the source HF dir, or written from a GGUF's embedded tokenizer.
Every export gets a model card ``README.md`` (:mod:`fairy2i_jax.hf.model_card`); a packed one also the
transformers remote code (:mod:`fairy2i_jax.hf.remote`) and its ``auto_map``.

Streaming and safety: every tensor is planned (name, shape, dtype) before any is computed, then computed on
device, fetched and written one at a time into safetensors shards of at most 5 GB (+ index), so no host ever
holds the whole model. Everything is written into a hidden temporary directory next to ``out`` and renamed into
place only when complete: a failure leaves no partial ``out``. A non-empty ``out`` is refused unless
``overwrite``; even then a training run directory or the export's own source is never replaced, and the old
``out`` is removed only after the new one is in place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import typing
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import jax
import numpy as np
from flax import nnx

from fairy2i_jax.convert import model_variables
from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.hf.config_map import config_to_hf
from fairy2i_jax.hf.keymap import hf_names
from fairy2i_jax.hf.model_card import write_model_card
from fairy2i_jax.hf.packed import PACKED_SUFFIXES, module_entry, packed_arrays, packed_shapes, quantization_config
from fairy2i_jax.hf.remote import copy_remote_code, remote_code_config
from fairy2i_jax.hf.safetensors_io import (
    MAX_SHARD_BYTES,
    SAFETENSORS_DTYPES,
    TensorPlan,
    read_header,
    write_sharded,
)
from fairy2i_jax.models.config import DTYPE_NAMES
from fairy2i_jax.models.linear import Linear
from fairy2i_jax.runs import DEFAULT_EXPORT, RUN_OWNED, is_run_dir
from fairy2i_jax.models.llama import CausalLM
from fairy2i_jax.widely_linear import from_widely_linear

ExportFormat = Literal["dequantized", "master", "packed"]
FORMATS: tuple[str, ...] = typing.get_args(ExportFormat)
DEFAULT_DTYPE = {"dequantized": "bfloat16", "master": "float32", "packed": "bfloat16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class ExportError(Fairy2iError, ValueError):
    """An export that cannot be done as asked (bad output dir, a layer the format cannot hold, ...)."""


def resolve_dtype(fmt: str, dtype: Any = None) -> np.dtype:
    """The export dtype: ``dtype`` or the format's default (module docstring); checks ``fmt``."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    name = str(np.dtype(dtype)) if dtype is not None else DEFAULT_DTYPE[fmt]
    if name not in DTYPE_NAMES:
        raise ExportError(f"export dtype must be one of {', '.join(DTYPE_NAMES)}, got {name}")
    return np.dtype(getattr(jax.numpy, name))


# ---------------------------------------------------------------------------------------------- tensors


def _host(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def linear_slices(model: CausalLM) -> Iterator[tuple[str, Linear, int | None]]:
    """``(HF module name, Linear, index in its layer stack or None)`` for every linear, one per layer."""
    for name, lin in model.named_linears().items():
        if ".*." in name:
            for i in range(model.config.num_layers):
                yield name.replace(".*.", f".{i}."), lin, i
        else:
            yield name, lin, None


def real_master_host(lin: Linear, layer: int | None, dtype: np.dtype) -> np.ndarray:
    """The layer's real master in ``dtype``: complex masters recomposed in float64 numpy (exact), else the kernel."""
    if lin.spec.complex_masters:
        U, W = (_host(m) for m in lin.masters(layer))
        return from_widely_linear(U, W, dtype=dtype)
    return _host(lin.real_master(layer)).astype(dtype)


def _quantized_host(lin: Linear, layer: int | None, table: nnx.Variable, dtype: np.dtype) -> np.ndarray:
    master = table.get_value() if lin.tied else None
    return _host(lin.forward_weight(master, layer)).astype(dtype)


class _PackedCache:
    """The host arrays of the last packed module (its four tensors are planned next to each other)."""

    def __init__(self):
        self.name, self.arrays = None, None

    def get(self, name: str, lin: Linear, layer: int | None, table: nnx.Variable, suffix: str) -> np.ndarray:
        if self.name != name:
            self.name = name
            self.arrays = packed_arrays(lin.packed(table.get_value() if lin.tied else None, layer))
        return self.arrays[suffix]


def keeps_tied_head(model: CausalLM, fmt: str) -> bool:
    """True when the export keeps ``tie_word_embeddings`` (no ``lm_head`` tensor): the head's matrix is the
    embedding table itself (not quantized), or the format stores masters."""
    cfg, head = model.config, model.lm_head
    return cfg.tie_word_embeddings and (fmt == "master" or not head.spec.quantized)


def _linear_plans(model: CausalLM, fmt: str, dtype: np.dtype) -> Iterator[TensorPlan]:
    table = model.embed_tokens.embedding
    cache = _PackedCache()
    for name, lin, layer in linear_slices(model):
        shape = (lin.out_features, lin.in_features)
        if lin.tied and keeps_tied_head(model, fmt):
            continue
        if fmt == "packed" and lin.spec.phase_codes:
            for suffix, (s_shape, s_dtype) in packed_shapes(*shape, lin.spec.quant).items():
                yield TensorPlan(f"{name}.{suffix}", s_shape, s_dtype,
                                 functools.partial(cache.get, name, lin, layer, table, suffix))
            continue
        if fmt == "packed" and lin.spec.quantized:
            raise ExportError(f"{name}: {lin.spec.quant.method} layers have no packed form (packed holds the "
                              "Fairy2i phase codes); export this model as 'dequantized'")
        if fmt == "master" or not lin.spec.quantized:
            produce = functools.partial(real_master_host, lin, layer, dtype)
        else:
            produce = functools.partial(_quantized_host, lin, layer, table, dtype)
        yield TensorPlan(f"{name}.weight", shape, dtype, produce)


def _other_plans(model: CausalLM, dtype: np.dtype) -> Iterator[TensorPlan]:
    """Embeddings, norms and biases (every param that is not a linear's weight), one plan per HF tensor."""
    cfg = model.config

    def fetch(var: nnx.Variable, layer: int | None) -> np.ndarray:
        value = var.get_value()
        return _host(value if layer is None else value[layer]).astype(dtype)

    for path, var in model_variables(model, linear_weights=False).items():
        shape = tuple(var.get_value().shape)
        stacked = cfg.scan_layers and path[0] == "layers"
        for i, name in enumerate(hf_names(path, cfg.scan_layers, cfg.num_layers)):
            layer = i if stacked else None
            yield TensorPlan(name, shape[1:] if stacked else shape, dtype, functools.partial(fetch, var, layer))


def _natural_key(name: str) -> tuple:
    """Sort key of an HF name: dot-separated parts, numbers compared as numbers (layer 2 before layer 10)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def tensor_plans(model: CausalLM, fmt: str, dtype: Any = None) -> list[TensorPlan]:
    """Every tensor of the export of ``model`` in ``fmt`` (shapes and dtypes only; nothing computed yet), in
    natural HF order (layer by layer). Works on an abstract model (``abstract_model``) for sizing."""
    dtype = resolve_dtype(fmt, dtype)
    plans = [*_other_plans(model, dtype), *_linear_plans(model, fmt, dtype)]
    return sorted(plans, key=lambda t: _natural_key(t.name))


def iter_real_state(model: CausalLM, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(HF tensor name, numpy array)`` one tensor at a time: the real HF state dict of ``model``.

    The tensors of the ``master`` format: complex masters recomposed with the float64 numpy path of
    ``from_widely_linear`` (one rounding to ``dtype``), real params as they are, scanned layers split per layer;
    quantized layers give their masters. ``dtype``: default the param dtype.
    """
    for plan in tensor_plans(model, "master", dtype or model.config.param_dtype):
        yield plan.name, plan.produce()


def to_real_state(model: CausalLM, dtype: Any = None) -> dict[str, np.ndarray]:
    """The whole real HF state dict of ``model`` (:func:`iter_real_state`; prefer the iterator for big models)."""
    return dict(iter_real_state(model, dtype))


def quantized_modules(model: CausalLM) -> dict[str, dict[str, Any]]:
    """``{HF module name: module_entry}`` of every ``qat`` linear (what ``quantization_config`` / the note list)."""
    return {name: module_entry(lin.out_features, lin.in_features, lin.spec.quant)
            for name, lin, _ in linear_slices(model) if lin.spec.quantized}


def export_config(model: CausalLM, fmt: str, dtype: Any = None) -> dict[str, Any]:
    """The ``config.json`` dict of the export (module docstring)."""
    dtype = resolve_dtype(fmt, dtype)
    cfg = model.config
    tied = cfg.tie_word_embeddings and keeps_tied_head(model, fmt)
    hf = config_to_hf(cfg.replace(tie_word_embeddings=tied), dtype)
    modules = quantized_modules(model)
    if fmt == "packed":
        hf["quantization_config"] = quantization_config(
            {name: entry for name, entry in modules.items() if entry["method"] == "complex_phase"})
        hf = remote_code_config(hf)  # transformers remote code: model_type fairy2i, base_model_type, auto_map
    else:
        hf["fairy2i"] = {"format": fmt, "quantization": modules}
    return hf


@dataclasses.dataclass(frozen=True)
class ExportSize:
    """Bytes of an export: ``total_bytes`` (all tensors); for packed layers, ``packed_bytes`` (codes + scales)
    over ``packed_weights`` real weights."""

    total_bytes: int
    packed_bytes: int = 0
    packed_weights: int = 0

    @property
    def bits_per_packed_weight(self) -> float | None:
        """``8 packed_bytes / packed_weights``: storage bits per quantized real weight, scales included."""
        return 8 * self.packed_bytes / self.packed_weights if self.packed_weights else None


def plans_size(plans: Sequence[TensorPlan], config: dict[str, Any]) -> ExportSize:
    """The :class:`ExportSize` of planned tensors (``config``: the export's config.json dict)."""
    modules = (config.get("quantization_config") or {}).get("modules", {})
    packed = {f"{base}.{s}" for base in modules for s in PACKED_SUFFIXES}
    return ExportSize(total_bytes=sum(t.nbytes for t in plans),
                      packed_bytes=sum(t.nbytes for t in plans if t.name in packed),
                      packed_weights=sum(m["out_features"] * m["in_features"] for m in modules.values()))


def size_on_disk(directory: str | os.PathLike) -> ExportSize:
    """The :class:`ExportSize` of an exported directory, measured from its safetensors headers."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    infos = {}
    for file in sorted(directory.glob("*.safetensors")):
        infos.update(read_header(file))
    plans = [TensorPlan(name, info.shape, SAFETENSORS_DTYPES[info.dtype], lambda: None) for name, info in infos.items()]
    return plans_size(plans, config)


# ------------------------------------------------------------------------------------ files and directories


def write_side_files(source: str | os.PathLike | None, dest: Path, config: dict[str, Any]) -> list[str]:
    """Tokenizer and generation files: copied from a source HF dir, written from a GGUF's embedded tokenizer,
    or (no source) none; a ``generation_config.json`` from the config's token ids when the source has none."""
    written = []
    source = Path(source) if source is not None else None
    if source is not None and source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, dest / name)
                written.append(name)
    elif source is not None and source.suffix == ".gguf":
        from fairy2i_jax.hf.gguf import gguf_tokenizer

        before = set(os.listdir(dest))
        gguf_tokenizer(source).save_pretrained(dest)
        written.extend(sorted(set(os.listdir(dest)) - before))
    if "generation_config.json" not in written:
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        written.append("generation_config.json")
    return written


def _related(a: Path, b: Path) -> str | None:
    """How ``a`` relates to ``b`` (both resolved): ``"is"``, ``"lies inside"``, ``"contains"``, or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def check_out_dir(out: Path, overwrite: bool, protected: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse an export target that could lose data (every refusal is one :class:`ExportError` line):

    * ``out`` that is, lies inside or contains a ``protected`` path (the export's source model or run);
    * ``out`` that is or lies inside a training run directory (:func:`fairy2i_jax.runs.is_run_dir`), except a
      new or export-holding direct child that is not one of the run's own entries (``<run>/hf``, the default
      export of a run, is fine; ``<run>/checkpoints`` never), or that holds one among its entries;
    * an existing non-empty ``out`` without ``overwrite``, and with ``overwrite`` any non-empty ``out`` that is not
      an earlier export of this module (:func:`is_export_dir`): ``--overwrite`` replaces exports, nothing else.
    """
    resolved = out.resolve()
    for path in protected:
        relation = _related(resolved, Path(path).resolve())
        if relation:
            raise ExportError(f"--out {out} {relation} the export's source {path}; it is never written to")
    for parent in (resolved, *resolved.parents):
        if is_run_dir(parent):
            own = parent == resolved or parent != resolved.parent or resolved.name in RUN_OWNED
            if own:
                raise ExportError(f"--out {out} {_related(resolved, parent)} the training run directory {parent}; "
                                  f"an export may go to a new directory such as {parent / DEFAULT_EXPORT}")
    if not out.exists():
        if not out.parent.is_dir():
            raise ExportError(f"--out {out}: its parent directory {out.parent} does not exist")
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    entries = list(out.iterdir())
    if not entries:
        return
    runs_inside = [e.name for e in entries if is_run_dir(e)]
    if runs_inside:
        raise ExportError(f"--out {out} contains the training run directory {runs_inside[0]}; it is never replaced")
    if not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; choose a new directory or pass --overwrite "
                          "(the old one is replaced only once the new export is complete)")
    if not is_export_dir(out):
        raise ExportError(f"--out {out} is not an earlier export (no fairy2i config.json); --overwrite replaces only "
                          "exports, never other directories")


def is_export_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds an export of this module (its config.json has the ``fairy2i`` note or a fairy2i
    ``quantization_config``): what a training run may replace with its next export."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config")
    return "fairy2i" in config or (isinstance(quant, dict) and quant.get("quant_method") == "fairy2i")


def _commit(tmp: Path, out: Path) -> None:
    """Put the complete ``tmp`` in place of ``out`` (an old ``out`` is moved aside first, deleted last)."""
    if out.exists() and any(out.iterdir()):
        aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, aside)
        os.rename(tmp, out)
        shutil.rmtree(aside)
    else:
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where an export went: ``path``, the files written and the :class:`ExportSize`."""

    path: Path
    files: list[str]
    size: ExportSize


def export_model(model: CausalLM, out: str | os.PathLike, fmt: str = "dequantized", *, dtype: Any = None,
                 tokenizer_from: str | os.PathLike | None = None, overwrite: bool = False,
                 max_shard_bytes: int = MAX_SHARD_BYTES, protected: Sequence[str | os.PathLike] = (),
                 progress: bool = True, model_card: dict[str, Any] | None = None) -> ExportResult:
    """Export ``model`` to the HF directory ``out`` in ``fmt`` (module docstring). ``tokenizer_from``: the HF dir
    or ``.gguf`` whose tokenizer goes along; ``protected``: paths ``out`` must never replace. Single-process only
    (each tensor is fetched whole to this host, one at a time). ``model_card``: keyword arguments of
    :func:`fairy2i_jax.hf.model_card.build_model_card` (``base_model``, ``run``, ``preset``, ``repo_id``) for the
    ``README.md`` every export gets. Raises :class:`ExportError`."""
    if jax.process_count() > 1:
        raise ExportError("export runs in a single process: run `python -m fairy2i_jax.export --from RUN_DIR` "
                          "after the multi-host run (it restores the checkpoint on one host)")
    out = Path(out).absolute()
    dtype = resolve_dtype(fmt, dtype)
    check_out_dir(out, overwrite, protected)
    config = export_config(model, fmt, dtype)
    plans = tensor_plans(model, fmt, dtype)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create {tmp} ({e.strerror or e})") from None
    try:
        from tqdm.auto import tqdm

        with tqdm(total=sum(t.nbytes for t in plans), unit="B", unit_scale=True, desc=f"export {fmt}",
                  disable=not progress) as bar:
            files = write_sharded(tmp, [_finite_only(t) for t in plans], max_shard_bytes,
                                  on_tensor=lambda t: bar.update(t.nbytes))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        files = [*files, "config.json", *write_side_files(tokenizer_from, tmp, config)]
        files += copy_remote_code(tmp) if fmt == "packed" else []  # loads with trust_remote_code=True
        files.append(write_model_card(tmp, config, fmt, **(model_card or {})))
        _commit(tmp, out)
    except OSError as e:  # a full disk, permissions: one line, and nothing partial is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"export to {out} failed while writing ({e.strerror or e}); nothing was written to "
                          f"{out}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, files, plans_size(plans, config))


def _finite_only(plan: TensorPlan) -> TensorPlan:
    """``plan`` whose ``produce()`` raises :class:`ExportError` naming the tensor when a value is NaN or infinite
    (a diverged or corrupt checkpoint must not become a silently broken export)."""

    def produce() -> np.ndarray:
        array = plan.produce()
        if jax.numpy.issubdtype(array.dtype, jax.numpy.floating):  # bfloat16 included
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise ExportError(f"tensor {plan.name} holds {bad} non-finite value(s) (NaN or inf); the export was "
                                  "stopped and nothing was written (is the checkpoint from a diverged run?)")
        return array

    return dataclasses.replace(plan, produce=produce)
