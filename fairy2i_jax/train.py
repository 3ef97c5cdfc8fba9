"""Train a Fairy2i model: ``python train.py [--config configs/NAME.yaml] [key=value ...]`` (also
``python -m fairy2i_jax.train`` and ``fairy2i-train``, from any directory).

Without ``--config`` the embedded default ``configs/smollm2_135m_w2.yaml`` runs (SmolLM2-135M, Austen, W2 QAT,
a few minutes on a CPU; the config and the corpus ship with the package). Re-running the same command resumes
from the run directory's latest checkpoint. SIGTERM / SIGINT save a checkpoint and exit 0. ``--print-config``
prints the resolved config and exits; ``--help`` lists every config key with its default.

Multi-host: pass ``--coordinator HOST:PORT --num-processes N --process-id I`` (or set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or ``--distributed`` to let
``jax.distributed.initialize()`` detect a TPU pod / SLURM / MPI cluster. Every host runs the same command.
"""

from __future__ import annotations

import argparse
import os
import sys


def _keys_help() -> str:
    """The config keys with the values of the default run (the schema's defaults if that config cannot load)."""
    from fairy2i_jax.config import describe
    from fairy2i_jax.errors import Fairy2iError
    from fairy2i_jax.training.config import DEFAULT_CONFIG, TrainConfig, load_train_config

    try:
        return f"config keys, with the values of {DEFAULT_CONFIG.name} (the default run):\n" + describe(
            load_train_config())
    except Fairy2iError:
        return "config keys, with the schema's defaults:\n" + describe(TrainConfig)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, epilog=_keys_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: configs/smollm2_135m_w2.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
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


def _train(args) -> None:
    """Load the config (print it with ``--print-config``) and run it."""
    from fairy2i_jax.training import load_train_config, run

    cfg = load_train_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        from fairy2i_jax.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    run(cfg)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.print_config:
        init_distributed(args)
    from fairy2i_jax.errors import run_cli

    return run_cli(_train, args)


if __name__ == "__main__":
    sys.exit(main())
