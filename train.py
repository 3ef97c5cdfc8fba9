"""Train a Fairy2i model: ``python train.py [--config configs/NAME.yaml] [key=value ...]``; see
:mod:`fairy2i_jax.train` (the same command as ``python -m fairy2i_jax.train`` and ``fairy2i-train``)."""

import sys

from fairy2i_jax.train import main

if __name__ == "__main__":
    sys.exit(main())
