"""The package's structure: no import from a higher layer into a lower one (fairy2i_jax/__init__.py's layering
note), no module over 500 lines, and a test file for every module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fairy2i_jax"
# Most specific prefix first; the numbers are the layers of fairy2i_jax/__init__.py's docstring.
LAYERS = [
    ("fairy2i_jax.evaluation.cli", 11), ("fairy2i_jax.evaluation.lm_eval_cli", 11),
    ("fairy2i_jax.training.plot", 11), ("fairy2i_jax.training.plan", 11), ("fairy2i_jax.export", 11),
    ("fairy2i_jax.train", 11), ("fairy2i_jax.generate.__main__", 11), ("fairy2i_jax.data.__main__", 11),
    ("fairy2i_jax.errors", 1), ("fairy2i_jax.config", 1), ("fairy2i_jax.jsonl", 1),
    ("fairy2i_jax.widely_linear", 2), ("fairy2i_jax.quant", 2), ("fairy2i_jax.packing", 2),
    ("fairy2i_jax.kernels", 3),
    ("fairy2i_jax.sharding", 4), ("fairy2i_jax.models", 4),
    ("fairy2i_jax.convert", 5), ("fairy2i_jax.runs", 5),
    ("fairy2i_jax.hf", 6),
    ("fairy2i_jax.sources", 7),
    ("fairy2i_jax.data", 8),
    ("fairy2i_jax.generate", 9), ("fairy2i_jax.evaluation", 9),
    ("fairy2i_jax.training", 10),
]
MAX_LINES = 500
# Test files whose name is not test_<module file name>.py (the file name alone would be ambiguous or unclear).
TEST_FILE = {
    "fairy2i_jax/models/config.py": "test_model_config.py",
    "fairy2i_jax/training/config.py": "test_train_config.py",
    "fairy2i_jax/hf/export.py": "test_export.py",
    "fairy2i_jax/export.py": "test_export_cli.py",
    "fairy2i_jax/evaluation/cli.py": "test_eval_cli.py",
    "fairy2i_jax/hf/load.py": "test_hf_load.py",
    "fairy2i_jax/train.py": "test_train_cli.py",
    "fairy2i_jax/generate/engine.py": "test_generate.py",
    "fairy2i_jax/generate/__main__.py": "test_generate_cli.py",
    **{f"fairy2i_jax/kernels/{m}.py": "test_kernels.py" for m in ("api", "base", "decode", "layout", "reference", "xla")},
    **{f"fairy2i_jax/kernels/{m}.py": "test_kernels_pallas.py" for m in ("pallas_gpu", "pallas_tpu")},
    "fairy2i_jax/data/__main__.py": "test_data_cli.py",
}


def _modules() -> list[Path]:
    """Every module of the package but the package ``__init__`` files (re-exports) and the remote code that
    exports copy into their directories (plain torch, never imported by the package)."""
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py" and "remote" not in p.relative_to(PACKAGE).parts[:-1])


def _name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _layer(module: str) -> int | None:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def _is_module(name: str) -> bool:
    rel = ROOT.joinpath(*name.split("."))
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``fairy2i_jax`` import in ``path``, including those inside functions
    (``from fairy2i_jax.a import b`` names the module ``a.b`` when ``b`` is one, else ``a``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("fairy2i_jax")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fairy2i_jax"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.append((node.lineno, full if _is_module(full) else node.module))
    return found


def test_every_module_has_a_layer():
    assert [_name(p) for p in _modules() if _layer(_name(p)) is None] == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_from_a_higher_layer(path):
    own = _layer(_name(path))
    bad = [f"line {line}: {module} (layer {_layer(module)})" for line, module in _imports(path)
           if module != "fairy2i_jax" and (_layer(module) or 0) > own]
    assert bad == [], f"{_name(path)} (layer {own}) imports from a higher layer"


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_module_has_its_test_file():
    """``tests/test_<module>.py`` (or the name in TEST_FILE) exists and imports the module."""
    problems = []
    for path in _modules():
        rel = str(path.relative_to(ROOT))
        test = ROOT / "tests" / TEST_FILE.get(rel, f"test_{path.stem}.py")
        module = _name(path)
        if not test.is_file():
            problems.append(f"{rel}: no {test.relative_to(ROOT)}")
        elif module not in {name for _, name in _imports(test)}:
            problems.append(f"{rel}: {test.relative_to(ROOT)} does not import {module}")
    assert problems == []
