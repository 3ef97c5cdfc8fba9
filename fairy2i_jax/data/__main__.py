"""``python -m fairy2i_jax.data``: build and inspect token stores (:mod:`fairy2i_jax.data.store`).

    python -m fairy2i_jax.data tokenize --config CFG --out DIR [--split train] [--num-proc N] [--overwrite]
                                        [--no-progress] [key=value ...]
    python -m fairy2i_jax.data info DIR

``tokenize`` reads the config like ``train.py`` (same ``key=value`` overrides), tokenizes the entries of
``data.<split>`` (local files and ``hf:`` datasets) with the tokenizer of ``model.path``, in ``--num-proc``
processes, into a new store at ``DIR`` (atomically; an existing store is replaced only with ``--overwrite``),
and prints what to put in the config (``data.train: [store:DIR]``). ``info`` prints a store's manifest.
Errors a user can fix are printed as one line (exit code 2).
"""

from __future__ import annotations

import argparse
import sys

from fairy2i_jax import sources
from fairy2i_jax.data.documents import DataError, store_entry_path
from fairy2i_jax.data.store import read_manifest
from fairy2i_jax.data.tokenize import tokenize_to_store
from fairy2i_jax.errors import run_cli
from fairy2i_jax.training.config import load_train_config

SPLITS = ("train", "eval", "test")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fairy2i_jax.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tokenize", help="tokenize a config's data entries into a token store")
    t.add_argument("--config", required=True, help="the training config (YAML) whose model and data to use")
    t.add_argument("--out", required=True, help="the store directory to create")
    t.add_argument("--split", default="train", choices=SPLITS, help="which data list to tokenize (data.<split>)")
    t.add_argument("--num-proc", type=int, default=1, help="tokenizer processes (default 1)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing token store at --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.doc_split=line")
    i = sub.add_parser("info", help="print a token store's manifest")
    i.add_argument("store", help="the store directory")
    args, rest = p.parse_known_args(argv)  # key=value overrides may come between the options too
    stray = [r for r in rest if r.startswith("-") or "=" not in r or args.command != "tokenize"]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def tokenize(args) -> None:
    cfg = load_train_config(args.config, args.overrides)
    entries = list(getattr(cfg.data, args.split))
    if not entries:
        raise DataError(f"data.{args.split} lists no entry in {args.config}")
    if store_entry_path(entries, f"data.{args.split}") is not None:
        raise DataError(f"data.{args.split} = {entries} is already a token store; point it at the source files")
    if args.num_proc < 1:
        raise DataError(f"--num-proc must be >= 1, got {args.num_proc}")
    tokenizer = sources.load_source_tokenizer(sources.resolve(cfg.model.path))
    result = tokenize_to_store(entries, tokenizer, args.out, source=cfg.model.path, doc_split=cfg.data.doc_split,
                               text_key=cfg.data.text_key, num_proc=args.num_proc, overwrite=args.overwrite,
                               progress=not args.no_progress)
    m = result.manifest
    print(f"token store {result.path}: {m.num_tokens} tokens ({m.dtype}), {m.num_docs} documents, "
          f"{result.seconds:.1f} s ({result.tokens_per_s:,.0f} tokens/s, {args.num_proc} process(es))")
    print(f"use it with: data.{args.split}=[store:{result.path}]")


def info(args) -> None:
    print(read_manifest(args.store).to_json(), end="")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(tokenize if args.command == "tokenize" else info, args)


if __name__ == "__main__":
    sys.exit(main())
