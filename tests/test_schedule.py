"""fairy2i_jax.training.schedule: the official warmup-stable-decay values of the 7B preset, cosine and constant
with warmup, on the optimizer step count."""

import math
from pathlib import Path

import numpy as np

from fairy2i_jax.training.config import load_train_config
from fairy2i_jax.training.schedule import make_schedule, warmup_factor
from train_helpers import optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_official_wsd_schedule_values():
    """The official lr_lambda: s/300 during warmup (0 at the first update), 1, cosine to 0.1667 over
    8000-10000, flat, cosine to 0.03333 over 19000-20000, flat; times the peak lr 3e-5."""
    cfg = load_train_config(CONFIGS / "llama2_7b_w2.yaml")
    lr = make_schedule(cfg.optimizer, cfg.train.steps)
    want = {0: 0.0, 150: 0.5, 300: 1.0, 7999: 1.0, 8000: 1.0, 9000: (1 + 0.1667) / 2, 10000: 0.1667,
            15000: 0.1667, 19500: (0.1667 + 0.03333) / 2, 20000: 0.03333, 29999: 0.03333}
    for step, factor in want.items():
        np.testing.assert_allclose(float(lr(step)), 3e-5 * factor, rtol=1e-5, atol=1e-12, err_msg=str(step))
    p = 0.25  # a quarter into the first decay
    np.testing.assert_allclose(float(lr(8500)), 3e-5 * (0.1667 + 0.8333 * 0.5 * (1 + math.cos(math.pi * p))),
                               rtol=1e-5)
    cos = load_train_config(CONFIGS / "debug.yaml", ["optimizer.schedule=cosine", "optimizer.warmup_steps=10",
                                                      "optimizer.min_lr_factor=0.1", "optimizer.lr=1.0"])
    f = make_schedule(cos.optimizer, 110)
    np.testing.assert_allclose([float(f(s)) for s in (0, 5, 10, 60, 110, 200)], [0, 0.5, 1, 0.55, 0.1, 0.1],
                               atol=1e-6)


def test_constant_schedule_with_and_without_warmup():
    """Warmup ``s / warmup_steps`` from 0 at the first update, then the peak lr; no warmup: the peak from step 0."""
    lr = make_schedule(optimizer("sgd", 0.5, warmup_steps=4), 100)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 1, 2, 4, 50)], [0, 0.125, 0.25, 0.5, 0.5], rtol=1e-6)
    flat = make_schedule(optimizer("sgd", 0.5), 100)
    assert [float(flat(s)) for s in (0, 99)] == [0.5, 0.5]
    assert float(warmup_factor(7, 0)) == 1.0
