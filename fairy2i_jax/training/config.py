"""The training config: frozen dataclasses, one section per concern, loaded with :func:`load_train_config`.

``python train.py --config configs/NAME.yaml key=value ...`` builds :class:`TrainConfig` with
:func:`fairy2i_jax.config.load_config` (unknown keys -> ``ConfigError`` listing the valid keys). Every section
checks its own values in ``__post_init__`` (a ``ValueError`` naming the key, turned into ``ConfigError``).

Sections declared elsewhere: ``model`` is :class:`fairy2i_jax.sources.ModelSection` (``model.path`` is any model
source of :mod:`fairy2i_jax.sources`: HF dir, ``.gguf``, hub id, ``pkg:<package>/<file>``, ``random:tiny``),
``quant`` is :class:`fairy2i_jax.convert.QuantSection`. Every list of allowed values is a ``Literal`` alias
imported from the module that owns it, checked by the loader and by :func:`fairy2i_jax.config.check_choices`.

Learning-rate schedules (``optimizer.schedule``), as a factor of ``optimizer.lr`` at optimizer step ``s``
(the update applied after ``s`` earlier updates, so the first update uses ``s = 0``):

* ``constant``: ``min(1, s / warmup_steps)`` (linear warmup from 0).
* ``cosine``: warmup, then ``f + (1 - f) * (1 + cos(pi * p)) / 2`` with ``p = (s - warmup) / (steps - warmup)``
  and ``f = min_lr_factor``.
* ``wsd``: warmup, then 1.0, then for each ``(start, end, factor)`` of ``decay_stages`` a cosine from the
  previous factor to ``factor`` over ``[start, end)``, constant after ``end`` (the official Fairy2i schedule).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Literal

from fairy2i_jax.config import ConfigError, LocalPath, check_choices, load_config, to_dict
from fairy2i_jax.convert import QuantSection
from fairy2i_jax.data import HF_PREFIX, DocSplit, parse_hf_entry, store_entry_path
from fairy2i_jax.hf.export import ExportFormat
from fairy2i_jax.models.config import DtypeName
from fairy2i_jax.sources import ModelSection
from fairy2i_jax.training.optim import PARAM_GROUPS, Coordinates, OptimizerName, ParamGroup
from fairy2i_jax.training.schedule import ScheduleName
from fairy2i_jax.training.teacher import TeacherName

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the presets, shipped with the package
DEFAULT_CONFIG = CONFIG_DIR / "smollm2_135m_w2.yaml"
AUSTEN = "pkg:fairy2i_jax/corpora/austen"  # the bundled corpus (train / validation / test novels)
__all__ = ["ModelSection", "QuantSection", "TrainConfig", "load_train_config"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh ``(data, fsdp, tensor)``; one axis may be -1 = all remaining devices. ``seq``: the mesh axis
    the residual stream's sequence is sharded over (``none`` = off; ``tensor`` = sequence parallelism), see
    :mod:`fairy2i_jax.sharding`."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    seq: Literal["none", "tensor"] = "none"

    @property
    def seq_axis(self) -> str | None:
        """The ``seq`` rule: a mesh axis name, or None when off."""
        return None if self.seq == "none" else self.seq

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        _check(all(s == -1 or s >= 1 for s in sizes), f"mesh sizes must be >= 1 or -1, got {sizes}")
        _check(sizes.count(-1) <= 1, f"at most one mesh axis may be -1, got {sizes}")
        check_choices(self, "mesh")

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete ``(data, fsdp, tensor)`` for ``num_devices`` (-1 takes the remaining devices)."""
        sizes = [self.data, self.fsdp, self.tensor]
        known = 1
        for s in sizes:
            known *= s if s != -1 else 1
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"mesh {tuple(sizes)}: {num_devices} devices are not a multiple of {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if sizes[0] * sizes[1] * sizes[2] > num_devices:
            raise ConfigError(f"mesh {tuple(sizes)} needs {sizes[0] * sizes[1] * sizes[2]} devices, "
                              f"only {num_devices} available")
        return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training / held-out / test data: each a list of entries (:mod:`fairy2i_jax.data.documents`): local files
    or directories, ``hf:NAME[:CONFIG][:SPLIT]`` datasets (streamed, online only), or one ``store:DIR`` token
    store (``python -m fairy2i_jax.data tokenize``; then ``doc_split`` / ``text_key`` must be the store's)."""

    train: tuple[LocalPath, ...] = (f"{AUSTEN}/train",)
    eval: tuple[LocalPath, ...] = (f"{AUSTEN}/validation",)
    test: tuple[LocalPath, ...] = (f"{AUSTEN}/test",)
    doc_split: DocSplit = "paragraph"
    text_key: str = "text"
    seq_len: int = 128
    global_batch: int = 4
    seed: int = 0

    def __post_init__(self):
        _check(len(self.train) > 0, "data.train lists no file")
        for key in ("train", "eval", "test"):
            entries = getattr(self, key)
            store_entry_path(entries, f"data.{key}")
            for entry in entries:
                if entry.startswith(HF_PREFIX):
                    parse_hf_entry(entry)
        check_choices(self, "data")
        _check(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        _check(self.global_batch >= 1, f"data.global_batch must be >= 1, got {self.global_batch}")
        _check(0 <= self.seed < 2**32, f"data.seed must be in [0, 2**32), got {self.seed}")


@dataclasses.dataclass(frozen=True)
class GroupsSection:
    """Parameter groups (``optimizer.groups``; the groups and their formula: :mod:`fairy2i_jax.training.optim`):
    ``embed`` the embedding table (with tied embeddings also the head), ``norm`` the RMSNorm weights, ``head`` the
    untied output head, ``linear`` every other param (the decoder linears and their biases).

    ``embed_lr_scale`` / ``norm_lr_scale`` / ``head_lr_scale``: that group's learning rate is ``scale * lr(s)``
    (``0`` = frozen; ``linear`` keeps ``lr(s)``). ``no_decay``: groups that ``optimizer.weight_decay`` skips (e.g.
    ``[embed, norm]``). The defaults (1, 1, 1, none) are one group: the optimizer without groups, bit for bit.
    """

    embed_lr_scale: float = 1.0
    norm_lr_scale: float = 1.0
    head_lr_scale: float = 1.0
    no_decay: tuple[ParamGroup, ...] = ()

    def __post_init__(self):
        for name in ("embed", "norm", "head"):
            scale = getattr(self, f"{name}_lr_scale")
            _check(scale >= 0, f"optimizer.groups.{name}_lr_scale must be >= 0, got {scale}")

    def lr_scales(self) -> dict[str, float]:
        """``{group: lr scale}`` for every group of :data:`~fairy2i_jax.training.optim.PARAM_GROUPS`."""
        scales = {"embed": self.embed_lr_scale, "norm": self.norm_lr_scale, "head": self.head_lr_scale}
        return {name: float(scales.get(name, 1.0)) for name in PARAM_GROUPS}

    @property
    def is_default(self) -> bool:
        """True for the defaults (no group transform at all)."""
        return self == GroupsSection()


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    """Optimizer, learning-rate schedule (module docstring) and the coordinates Adam works in.

    ``coordinates``: ``real`` = Adam statistics on the original real weight ``A = recompose(U, W)`` (the
    official dynamics, exactly); ``complex`` = Adam per real / imaginary coordinate of ``U`` and ``W``.
    ``clip_norm``: global-norm gradient clipping in those coordinates (0 = off). ``groups``: per-group learning
    rate scales and weight decay (:class:`GroupsSection`).
    """

    name: OptimizerName = "adamw"
    lr: float = 3e-5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 2.0
    schedule: ScheduleName = "wsd"
    warmup_steps: int = 300
    decay_stages: tuple[tuple[int, int, float], ...] = ((8000, 10000, 0.1667), (19000, 20000, 0.03333))
    min_lr_factor: float = 0.1  # final factor of the cosine schedule
    coordinates: Coordinates = "real"
    groups: GroupsSection = dataclasses.field(default_factory=GroupsSection)

    def __post_init__(self):
        check_choices(self, "optimizer")
        _check(self.lr >= 0, f"optimizer.lr must be >= 0, got {self.lr}")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"optimizer.b1/b2 must be in [0, 1), got {self.b1}, {self.b2}")
        _check(self.eps >= 0 and self.weight_decay >= 0 and self.clip_norm >= 0,
               "optimizer.eps, weight_decay and clip_norm must be >= 0")
        _check(self.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        last = self.warmup_steps
        for i, (start, end, factor) in enumerate(self.decay_stages):
            _check(last <= start < end and factor >= 0,
                   f"optimizer.decay_stages[{i}] = {(start, end, factor)}: need previous end (or warmup) {last} "
                   "<= start < end and factor >= 0")
            last = end


@dataclasses.dataclass(frozen=True)
class DistillSection:
    """Logits distillation in the QAT steps; ``weight = 0`` is off (no teacher is made or stored).

    Loss ``(1 - weight) * CE + weight * temperature^2 * KL(teacher_T || student_T)`` per scored token, with
    ``p_T = softmax(logits / temperature)``. ``teacher`` (:mod:`fairy2i_jax.training.teacher`): ``self`` = the
    student's own masters with quantization off, re-made every step (it drifts with training); ``frozen`` = the
    original real model, held fixed in the compute dtype for the whole run (one more compute-dtype copy of the
    model on the devices and in every checkpoint).
    """

    weight: float = 0.0
    temperature: float = 1.0
    teacher: TeacherName = "self"

    def __post_init__(self):
        check_choices(self, "distill")
        _check(0.0 <= self.weight <= 1.0, f"distill.weight must be in [0, 1], got {self.weight}")
        _check(self.temperature > 0, f"distill.temperature must be > 0, got {self.temperature}")

    @property
    def frozen(self) -> bool:
        """True when the steps distill from a frozen teacher (``weight > 0`` and ``teacher: frozen``)."""
        return self.weight > 0 and self.teacher == "frozen"


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Steps, accumulation, logging, evaluation and checkpoint cadence; ``run_dir`` holds everything."""

    steps: int = 30
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0 = only at the end (and on SIGTERM / SIGINT)
    keep_checkpoints: int = 2
    run_dir: str = "runs/smollm2_135m_w2"
    progress: bool = True

    def __post_init__(self):
        _check(self.steps >= 0, f"train.steps must be >= 0, got {self.steps}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        for key in ("log_every", "eval_every", "eval_batches", "checkpoint_every"):
            _check(getattr(self, key) >= 0, f"train.{key} must be >= 0, got {getattr(self, key)}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _check(bool(self.run_dir), "train.run_dir is empty")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Perplexity on ``data.test`` (official packed protocol) before and after training; 0 tokens = off."""

    ppl_max_tokens: int = 4096  # tokens of the test text scored (a cap that fits a CPU budget)
    ppl_seq_len: int = 512
    ppl_batch: int = 4
    ppl_before: bool = True  # also report fp and PTQ perplexity before training (fresh runs only)

    def __post_init__(self):
        _check(self.ppl_max_tokens >= 0, f"eval.ppl_max_tokens must be >= 0, got {self.ppl_max_tokens}")
        _check(self.ppl_seq_len >= 2 and self.ppl_batch >= 1, "eval.ppl_seq_len must be >= 2 and ppl_batch >= 1")


@dataclasses.dataclass(frozen=True)
class ExportSection:
    """The HF directory written at the end of a run (:mod:`fairy2i_jax.hf.export`); ``format: none`` = off.

    ``dtype``: ``default`` (bfloat16 for dequantized / packed, float32 for master), or float32 / bfloat16 /
    float16; ``dir``: default ``<run_dir>/hf`` (replaced by the next export of the same run).
    """

    format: Literal[ExportFormat, "none"] = "dequantized"
    dtype: Literal[DtypeName, "default"] = "default"
    dir: str = ""

    def __post_init__(self):
        check_choices(self, "export")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs (one section per dataclass above)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    quant: QuantSection = dataclasses.field(default_factory=QuantSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    distill: DistillSection = dataclasses.field(default_factory=DistillSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    export: ExportSection = dataclasses.field(default_factory=ExportSection)

    def __post_init__(self):
        if self.export.format == "packed" and not self.quant.spec.phase_codes:
            raise ValueError(f"export.format packed holds Fairy2i phase codes; quant.preset {self.quant.preset} "
                             "has none (use export.format=dequantized)")
        if self.data.global_batch % self.train.grad_accum:
            raise ValueError(f"data.global_batch {self.data.global_batch} is not a multiple of train.grad_accum "
                             f"{self.train.grad_accum}")


# Keys that may change between a run and its resumption (everything else must match the saved config).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.progress", "train.run_dir",
                     "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.seq", "eval.ppl_max_tokens", "eval.ppl_seq_len",
                     "eval.ppl_batch", "eval.ppl_before", "export.format", "export.dtype", "export.dir")


def load_train_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """:class:`TrainConfig` from ``path`` (default :data:`DEFAULT_CONFIG`) plus ``key=value`` overrides."""
    return load_config(TrainConfig, DEFAULT_CONFIG if path is None else path, overrides)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists stay values)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def incompatible_changes(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two ``to_dict`` configs, except :data:`RESUMABLE_CHANGES`. A key
    the saved config lacks (one added since that run was written) counts as its default value, so a run keeps
    resuming when new options appear with defaults that leave it as it was."""
    a, b = {**flatten(to_dict(TrainConfig())), **flatten(saved)}, flatten(current)
    return sorted(k for k in set(a) | set(b) if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k))
