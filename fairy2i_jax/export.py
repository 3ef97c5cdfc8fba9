"""``python -m fairy2i_jax.export``: a training run or an HF checkpoint -> an HF directory.

    python -m fairy2i_jax.export --from runs/smollm2_135m_w2 --out exports/smollm2_w2 --format dequantized
    python -m fairy2i_jax.export --from path/to/hf_dir --quant w2 --out exports/w2_ptq --format packed

``--from``: any model source of :mod:`fairy2i_jax.sources`: a ``train.py`` run directory (the trained QAT model of
the latest checkpoint, or ``--step``), or an HF directory / ``.gguf`` file / ``pkg:`` file / hub id / ``random:NAME``,
exported as it is (``--format master``) or as its PTQ model (``--quant w2|w1|...``, needed for ``dequantized``
and ``packed``). Formats, dtypes, tied heads and the safety rules (temporary directory, ``--overwrite``) are described in
:mod:`fairy2i_jax.hf.export`; every export gets a model card (``README.md``, :mod:`fairy2i_jax.hf.model_card`).
``--push-to-hub REPO_ID`` uploads the finished directory (:mod:`fairy2i_jax.hf.hub`); offline
(``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) it is refused before any work. Errors exit with code 2 and one
line naming the problem.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from fairy2i_jax.convert import QUANT_PRESETS
from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.hf.export import DEFAULT_DTYPE, FORMATS, ExportError, export_model
from fairy2i_jax.hf.hub import check_online, push_export
from fairy2i_jax.sources import card_info
from fairy2i_jax.hf.safetensors_io import MAX_SHARD_BYTES
from fairy2i_jax.models.config import DTYPE_NAMES
from fairy2i_jax.quant import NUMERICS

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes of ``"5GB"``, ``"500MB"``, ``"2GiB"`` or ``"1000"`` (HF's decimal units; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ExportError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def check_exported_tokenizer(source, model) -> None:
    """The tokenizer that travels with the export, checked against the model's vocabulary (none is fine)."""
    from fairy2i_jax import sources
    from fairy2i_jax.hf.tokenizer import TokenizerNotFound

    try:
        tokenizer = sources.load_source_tokenizer(source)
    except TokenizerNotFound:
        return
    sources.check_tokenizer(tokenizer, model.config, source.spec)


def load_source(args) -> tuple[object, object, object, list[Path]]:
    """``(resolved source, model, tokenizer files or None, protected paths)`` for ``--from`` (module docstring)."""
    from fairy2i_jax import sources
    from fairy2i_jax.convert import convert

    source = sources.resolve(args.source, step=args.step)
    protected = [source.path] if source.path is not None else []
    if source.kind == "run":
        if args.quant:
            raise ExportError(f"--quant applies to HF checkpoints; {source.path} is a training run (its config.yaml "
                              "says how it is quantized)")
        return source, sources.load_model(source, progress=not args.no_progress), sources.tokenizer_files(source), \
            protected
    if args.quant is None and args.format != "master":
        raise ExportError(f"--format {args.format} of an HF checkpoint needs --quant (one of "
                          f"{', '.join(QUANT_PRESETS)}): the PTQ model is exported")
    model = sources.load_model(source, param_dtype="float32", compute_dtype="float32", progress=not args.no_progress)
    check_exported_tokenizer(source, model)
    if args.quant is not None:
        model = convert(model, args.quant, numerics=args.numerics, lm_head=not args.lm_head_fp)
    return source, model, sources.tokenizer_files(source), protected


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fairy2i_jax.export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a training run or an HF checkpoint as an HF directory (dequantized, master or packed).",
        epilog="examples:\n" + __doc__.split("\n\n")[1])
    p.add_argument("--from", dest="source", required=True, help="run dir, HF dir, .gguf file or hub id")
    p.add_argument("--out", required=True, help="output HF directory (must not exist or be empty)")
    p.add_argument("--format", default="dequantized", choices=FORMATS)
    p.add_argument("--quant", default=None, choices=QUANT_PRESETS, help="PTQ preset for an HF --from")
    p.add_argument("--numerics", default="bf16_exact", choices=NUMERICS, help="with --quant")
    p.add_argument("--lm-head-fp", action="store_true", help="with --quant: keep the output head unquantized")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="dtype of the exported tensors (default: " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_DTYPE.items()) + ")")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run dir (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (once the export is complete)")
    p.add_argument("--max-shard-size", default=f"{MAX_SHARD_BYTES // 10**9}GB", help="safetensors shard size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="upload the finished export to this hub model repo (created if missing; needs the hub online)")
    p.add_argument("--base-model", metavar="HUB_ID", default=None,
                   help="the base model's hub id for the model card (default: --from or the run's model.path "
                        "when it is a hub id)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.push_to_hub:
            check_online(args.push_to_hub)  # before any work: offline exits 2 with nothing written
        max_shard = parse_size(args.max_shard_size)
        source, model, tokenizer_from, protected = load_source(args)
        card = card_info(source, preset=args.quant, base_model=args.base_model, repo_id=args.push_to_hub)
        result = export_model(model, args.out, args.format, dtype=args.dtype, tokenizer_from=tokenizer_from,
                              overwrite=args.overwrite, max_shard_bytes=max_shard, protected=protected,
                              progress=not args.no_progress, model_card=card)
    except Fairy2iError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = result.size
    print(f"exported {args.format} model to {result.path} ({size.total_bytes / 1e6:.1f} MB in "
          f"{sum(f.endswith('.safetensors') for f in result.files)} safetensors file(s))")
    if size.bits_per_packed_weight is not None:
        print(f"packed layers: {size.bits_per_packed_weight:.3f} bits per quantized weight, scales included")
    if args.push_to_hub:
        try:
            print(f"uploaded to {push_export(result.path, args.push_to_hub)}")
        except Fairy2iError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
