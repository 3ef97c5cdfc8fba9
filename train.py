"""Train a Fairy2i model: ``python train.py [--config configs/NAME.yaml] [key=value ...]``.

Without ``--config`` the embedded default ``configs/smollm2_135m_w2.yaml`` runs (SmolLM2-135M, Austen, W2 QAT,
a few minutes on a CPU). Re-running the same command resumes from the run directory's latest checkpoint.
SIGTERM / SIGINT save a checkpoint and exit 0.

Multi-host: pass ``--coordinator HOST:PORT --num-processes N --process-id I`` (or set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or ``--distributed`` to let
``jax.distributed.initialize()`` detect a TPU pod / SLURM / MPI cluster. Every host runs the same command.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: configs/smollm2_135m_w2.yaml)")
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="HOST:PORT of process 0 for multi-host runs")
    p.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
    p.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with auto-detection")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=100")
    return p.parse_args(argv)


def _env_int(name):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def init_distributed(args) -> None:
    """``jax.distributed.initialize`` when the command names a coordinator (or asks for auto-detection)."""
    import jax

    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise SystemExit("error: --coordinator needs --num-processes and --process-id "
                             "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
        if args.num_processes > 1:
            try:  # CPU cross-process collectives (no effect on GPU / TPU)
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            except (AttributeError, ValueError):
                pass
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    init_distributed(args)
    from fairy2i_jax.errors import Fairy2iError
    from fairy2i_jax.training import load_train_config, run

    try:
        run(load_train_config(args.config, args.overrides))
    except Fairy2iError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
