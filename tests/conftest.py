"""Test setup: 8 fake CPU devices (set before JAX initialises) so mesh tests run anywhere, offline mode, one JAX
persistent compilation cache for the session, and the session's one reference training run (shared by the tests
of the loop, the sources and the export).

The compilation cache: many tests build the same programs (the debug config's train step, the tiny models'
forward passes) in new closures, which JAX's in-memory caches do not share; the persistent cache is keyed by the
program itself, so a program compiles once per session, in this process, in pytest-xdist workers and in the
``train.py`` subprocesses (they inherit the variable). Executables are the same bits either way. The directory is
new per session (made by the first process, removed at its exit), so no run sees another's entries.
"""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="fairy2i_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # test helpers (the torch oracle) import as top-level modules

try:  # property tests draw the same examples every run (a failure reproduces; no run-to-run flakiness)
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("fairy2i_jax", derandomize=True, deadline=None)
    _hypothesis_settings.load_profile("fairy2i_jax")
except ImportError:
    pass


@pytest.fixture(scope="session")
def jax_compile_cache(tmp_path_factory):
    """The session's JAX persistent compilation cache (module docstring), for ``train.py`` subprocesses."""
    from pathlib import Path

    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(scope="session")
def reference(tmp_path_factory, jax_compile_cache):
    """``(run_dir, {step: loss})`` of the uninterrupted reference run (train_helpers.REFERENCE_ARGS), built once
    per session; tests read it or copy it, never change it."""
    from train_helpers import REFERENCE_STEPS, finish_reference, logged_losses

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish_reference(run_dir, jax_compile_cache)
    losses = logged_losses(run_dir)
    assert sorted(losses) == list(range(1, REFERENCE_STEPS + 1))
    return run_dir, losses
