"""Test setup: 8 fake CPU devices (set before JAX initialises) so mesh tests run anywhere, offline mode, and the
session's one reference training run (shared by the tests of the loop, the sources and the export)."""

import os
import sys

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # test helpers (the torch oracle) import as top-level modules


@pytest.fixture(scope="session")
def jax_compile_cache(tmp_path_factory):
    """A JAX persistent compilation cache shared by the ``train.py`` subprocesses of the session."""
    return tmp_path_factory.mktemp("jax_cache")


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
