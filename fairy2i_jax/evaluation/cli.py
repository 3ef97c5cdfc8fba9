"""The logic behind `eval.py`: models x quantization settings -> perplexity and lm-eval `acc`, one table.

    python eval.py --model PATH [--model PATH2 ...] --quant fp,w2,w1,binary,ternary --ppl-files a.txt.gz,b.txt \\
        [--ppl-datasets wikitext2,c4] [--protocol official,contiguous] [--seqlen 2048] [--max-tokens N] \\
        [--tasks arc_easy,piqa [--limit N]] [--json out.json]

Models: any model source of `fairy2i_jax.sources` (an HF or packed directory, a `.gguf` file, `pkg:PKG/FILE`,
`random:NAME`, a hub id when online, or a training run directory); the tokenizer comes from the same place.
Settings (`--quant`, comma separated): `trained` (the model exactly as loaded: for a run directory the QAT model
as trained, for a checkpoint the same as `fp`), `fp` (every linear real, complex masters recomposed,
unquantized) or a PTQ preset of `fairy2i_jax.convert` (`w1`..`w4`, `binary`, `ternary`) applied to the model's
(real or master) weights, with `--numerics`; `--lm-head-fp` keeps every output head in full precision, a
`:head-fp` suffix (`w2:head-fp`) only that setting's. A quantized model is evaluated with its weights
quantized once (`freeze_weights`), then it runs like a real model.

Perplexity (`fairy2i_jax.evaluation.perplexity`) of every `--ppl-files` file and `--ppl-datasets` dataset
(`fairy2i_jax.evaluation.ppl_datasets`: WikiText-2 test and two C4 validation shards from the HF hub, cut into
documents as the official eval code does; network or the local HF cache needed): `official` = the Fairy2i
packed protocol over the documents (of a file: `--doc-split`, default paragraphs), reported with both
denominators (the paper's, which counts the masked targets after EOS, and per scored token); `contiguous` =
the whole file (a dataset: its documents joined with "\\n\\n") tokenized once, windows of `--seqlen`
(`--stride` for overlapping ones). `--max-tokens` keeps the first N tokens (contiguous) or the first chunks
holding at most N tokens (official; at least one chunk). Every model is compiled once per shape bucket
(`jax_logits_fn`): `--seqlen`, plus powers of two up to `--max-length` when tasks run.

Errors a user can fix (a missing file, an empty text, an unknown task or dataset, a dataset that cannot be
loaded, an unusable model path) print one line on stderr and exit with code 2, before any model is loaded
where possible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from fairy2i_jax.convert import EVALUATION_SETTINGS, quantized_presets
from fairy2i_jax.data import DOC_SPLITS
from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.evaluation.perplexity import PROTOCOLS
from fairy2i_jax.models.config import DTYPE_NAMES
from fairy2i_jax.quant import NUMERICS

QUANTS = (*EVALUATION_SETTINGS, *quantized_presets())
HEAD_FP = ":head-fp"
DEFAULT_LENGTH = 2048  # --seqlen / --max-length when the model allows it


class EvalError(Fairy2iError):
    """A problem with the command line or its inputs: reported as one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One evaluated form of a model: `quant` (`fp` or a PTQ preset) and whether the output head stays fp."""

    quant: str
    head_fp: bool = False

    @property
    def label(self) -> str:
        return self.quant + (HEAD_FP if self.head_fp else "")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_settings(text: str, head_fp: bool = False) -> list[Setting]:
    """`"fp,w2,w2:head-fp"` -> settings; `head_fp` applies to every quantized one."""
    out = []
    for item in _csv(text):
        quant, suffix = (item[: -len(HEAD_FP)], True) if item.endswith(HEAD_FP) else (item, False)
        if quant not in QUANTS:
            raise EvalError(f"unknown --quant {item!r}; expected {', '.join(QUANTS)} (optionally with {HEAD_FP})")
        out.append(Setting(quant, (suffix or head_fp) and quant not in EVALUATION_SETTINGS))
    if not out:
        raise EvalError("--quant lists no setting")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The `eval.py` command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="eval.py", description="Evaluate models (HF dir, .gguf, hub id, training run dir) as fp or PTQ: "
        "perplexity (official and contiguous protocols) and lm-eval acc, in one table.")
    p.add_argument("--model", action="append", required=True, help="HF dir, .gguf file, hub id or run dir; repeat")
    p.add_argument("--quant", default="fp", help=f"comma list of {', '.join(QUANTS)} (suffix {HEAD_FP})")
    p.add_argument("--numerics", default="bf16_exact", choices=NUMERICS)
    p.add_argument("--lm-head-fp", action="store_true", help="keep the output head in full precision")
    p.add_argument("--compute-dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--ppl-files", default="", help="comma list of .txt/.txt.gz/.jsonl files")
    p.add_argument("--ppl-datasets", default="",
                   help="comma list of HF hub datasets: wikitext2 (wikitext-2-raw-v1 test, one document per "
                   "line), c4 (allenai/c4 validation shards 0-1, one per record); downloaded on first use "
                   "(needs network or the local HF cache)")
    p.add_argument("--protocol", default="official,contiguous", help="comma list of official, contiguous")
    p.add_argument("--doc-split", default="paragraph", choices=DOC_SPLITS,
                   help="what one document (item) of a --ppl-files file is in the official protocol")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"perplexity window / chunk length (default: {DEFAULT_LENGTH}, or the model's "
                   "max_position_embeddings when smaller)")
    p.add_argument("--stride", type=int, default=None, help="contiguous windows every N tokens (overlapping)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap the tokens evaluated per file / dataset (CPU)")
    p.add_argument("--tasks", default="", help="comma list of lm-eval tasks (metric: acc)")
    p.add_argument("--tasks-include", default=None, help="directory of local lm-eval task YAMLs")
    p.add_argument("--no-builtin-tasks", action="store_true",
                   help="only the --tasks-include tasks (skips indexing lm-eval's built-in tasks, ~10 s)")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or a fraction < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--encoding", default="official", choices=("official", "harness"), help="lm-eval encoding")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"lm-eval context length (default: {DEFAULT_LENGTH}, or the model's max_position_embeddings "
                   "when smaller)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--lm-eval-dir", default=None,
                   help="also write lm-eval's own results JSON of each (model, setting) into this directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ------------------------------------------------------------------------------------------------ inputs


@dataclasses.dataclass
class TextFile:
    """A perplexity input (a file or a dataset): its documents (official items) and its whole text (contiguous);
    `path` names it in messages, `name` in the table."""

    path: str
    name: str
    items: list[str]
    text: str


def read_ppl_files(paths: list[str], doc_split: str, reserved: set[str] = frozenset()) -> list[TextFile]:
    """Every `--ppl-files` entry read once; EvalError for a missing, unreadable or empty file. A file is named
    by its base name without extensions, or by its path when that name is shared or `reserved` (a dataset's)."""
    from fairy2i_jax.data import read_documents

    files, names = [], [os.path.basename(p).split(".")[0] for p in paths]
    for path, name in zip(paths, names):
        if not os.path.isfile(path):
            raise EvalError(f"perplexity file {path!r} does not exist")
        try:
            items = list(read_documents(path, doc_split=doc_split))
            whole = "\n\n".join(read_documents(path, doc_split="file"))
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise EvalError(f"cannot read perplexity file {path!r}: {e}") from None
        if not items or not whole.strip():
            raise EvalError(f"perplexity file {path!r} holds no text (empty or whitespace only)")
        unique = names.count(name) == 1 and name not in reserved
        files.append(TextFile(path, name if unique else path, items, whole))
    return files


def resolve_ppl_datasets(names: list[str]) -> list:
    """The `PplDataset`s of the `--ppl-datasets` names (EvalError for an unknown one), nothing loaded yet."""
    from fairy2i_jax.evaluation.ppl_datasets import PplDatasetError, resolve_ppl_datasets as resolve

    try:
        return resolve(names)
    except PplDatasetError as e:
        raise EvalError(str(e)) from None


def read_ppl_datasets(specs: list) -> list[TextFile]:
    """Every `PplDataset` loaded once (a note on stderr first: the first use downloads), its documents joined
    with "\\n\\n" for the contiguous protocol as for files; EvalError when one cannot be loaded or is empty."""
    from fairy2i_jax.evaluation.ppl_datasets import PplDatasetError, PplDatasetUnavailable, load_documents

    out = []
    for spec in specs:
        print(f"[eval] loading dataset {spec.name}: {spec.source} (downloaded into the HF cache on first use)",
              file=sys.stderr, flush=True)
        try:
            items = load_documents(spec)
        except PplDatasetUnavailable as e:
            raise EvalError(f"{e}; or evaluate a local copy of its text with --ppl-files") from None
        except PplDatasetError as e:
            raise EvalError(str(e)) from None
        whole = "\n\n".join(items)
        if not items or not whole.strip():
            raise EvalError(f"perplexity dataset {spec.name!r} ({spec.source}) holds no text (empty or "
                            "whitespace only)")
        out.append(TextFile(f"{spec.name} ({spec.source})", spec.name, items, whole))
    return out


def resolve_task_manager(tasks: list[str], include: str | None, builtin: bool = True):
    """An lm-eval TaskManager knowing every task; lm-eval's built-in tasks are indexed (~10 s) only when
    `builtin` and the include directory (if any) lacks one of the tasks."""
    if not tasks:
        return None
    from fairy2i_jax.evaluation.lm_eval_adapter import resolve_tasks

    if include is not None and not os.path.isdir(include):
        raise EvalError(f"--tasks-include directory {include!r} does not exist")
    if not builtin and include is None:
        raise EvalError("--no-builtin-tasks needs --tasks-include")
    try:
        if include is not None:
            try:
                return resolve_tasks(tasks, include, include_defaults=False)
            except ValueError:
                if not builtin:
                    raise
        return resolve_tasks(tasks, include, include_defaults=True)
    except ValueError as e:
        raise EvalError(str(e)) from None


# ------------------------------------------------------------------------------------------------ models


def check_model_spec(spec: str):
    """The resolved :class:`~fairy2i_jax.sources.ModelSource` of a ``--model`` entry (EvalError when it does not
    exist), nothing loaded yet."""
    from fairy2i_jax import sources

    try:
        return sources.resolve(spec)
    except sources.SourceError as e:
        raise EvalError(str(e)) from None


def resolve_lengths(models, args, perplexity: bool, tasks: bool) -> None:
    """Set ``args.seqlen`` / ``args.max_length`` left unset to min(DEFAULT_LENGTH, the smallest model's
    max_position_embeddings); EvalError when one given explicitly exceeds a model's positions (read from its config,
    no weights loaded): what train.py refuses for ``data.seq_len``."""
    from fairy2i_jax import sources

    positions = {}
    for source in models:
        try:
            positions[source.spec] = sources.model_config(source).max_position_embeddings
        except Fairy2iError as e:
            raise EvalError(f"cannot read model {source.spec!r}: {e}") from None
    fits = min([DEFAULT_LENGTH, *positions.values()])
    for flag, attr, used in (("--seqlen", "seqlen", perplexity), ("--max-length", "max_length", tasks)):
        if getattr(args, attr) is None:
            setattr(args, attr, fits)
        elif used:
            for spec, limit in positions.items():
                if getattr(args, attr) > limit:
                    raise EvalError(f"{flag} {getattr(args, attr)} exceeds the max_position_embeddings = {limit} "
                                    f"of {spec}")


def load_model(source, compute_dtype: str, progress: bool = True):
    """(CausalLM, tokenizer, display name) of a resolved ``--model`` source (float32 params; a run directory keeps
    its own dtypes); EvalError when it cannot be used."""
    from fairy2i_jax import sources

    try:
        loaded = sources.load(source, param_dtype="float32", compute_dtype=compute_dtype, progress=progress)
    except (Fairy2iError, FileNotFoundError) as e:
        raise EvalError(f"cannot load model {source.spec!r}: {e}") from None
    return loaded.model, loaded.tokenizer, source.name


def model_for(base, setting: Setting, numerics: str):
    """The model to evaluate for `setting` (module docstring), quantized weights frozen once."""
    from fairy2i_jax.convert import evaluation_model

    return evaluation_model(base, setting.quant, numerics=numerics, lm_head=not setting.head_fp)


# ------------------------------------------------------------------------------------------------ metrics


def perplexity_windows(file: TextFile, tokenizer, protocol: str, args) -> list:
    """The scored windows of `file` under `protocol`, capped at `--max-tokens`."""
    from fairy2i_jax.evaluation import perplexity as P

    try:
        if protocol == "contiguous":
            ids = P.contiguous_ids(file.text, tokenizer, file.path)[: args.max_tokens]
            return P.contiguous_windows(ids, args.seqlen, args.stride, source=file.path)
        chunks = P.official_packed_chunks(file.items, tokenizer, args.seqlen, file.path)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if args.max_tokens is not None:
        total = np.cumsum([len(c) for c in chunks])
        chunks = chunks[: max(1, int(np.searchsorted(total, args.max_tokens, side="right")))]
    return P.official_windows(chunks, tokenizer.eos_token_id)


def perplexity_metrics(logits_fn, windows: dict, args, pad_id: int) -> dict:
    """{file or dataset name: {protocol: numbers}} for the prepared `windows[(file, protocol)]`."""
    from fairy2i_jax.evaluation.perplexity import evaluate_perplexity

    out: dict = {}
    for (name, protocol), wins in windows.items():
        r = evaluate_perplexity(logits_fn, wins, args.batch_size, protocol, pad_id=pad_id,
                                progress=not args.no_progress, source=f"{name} {protocol}")
        out.setdefault(name, {})[protocol] = {
            "ppl": r.ppl_corrected, "ppl_official_denominator": r.ppl_official, "chunks": r.num_chunks,
            "tokens": r.num_tokens, "scored": r.num_scored, "positions": r.num_positions, "nll_sum": r.nll_sum}
    return out


def task_metrics(model, logits_fn, tokenizer, manager, tasks: list[str], args, label: str) -> dict:
    """{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}} through the lm-eval adapter (`acc` is what
    the paper reports); with `--lm-eval-dir`, lm-eval's own results JSON of this row goes to `<dir>/<label>.json`."""
    import lm_eval

    from fairy2i_jax.evaluation.lm_eval_adapter import LogitsLM

    lm = LogitsLM(logits_fn, tokenizer, max_length=args.max_length, batch_size=args.batch_size,
                  encoding=args.encoding, progress=not args.no_progress, model=model)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                                  limit=limit, log_samples=False, verbosity="ERROR")
    if args.lm_eval_dir:
        write_lm_eval_results(out, Path(args.lm_eval_dir) / f"{label}.json")
    results = out["results"]
    metrics = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
    return {t: {m: results[t].get(f"{m},none") for m in metrics} for t in tasks if t in results}


def write_lm_eval_results(out: dict, path: Path) -> None:
    """lm-eval's results dict as its own CLI writes it (samples left out, non-JSON values made printable)."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=2,
                               default=handle_non_serializable) + "\n")


# ------------------------------------------------------------------------------------------------ main


def run(args) -> list[dict]:
    """Check every input, then evaluate every (model, setting); returns the rows."""
    from fairy2i_jax.evaluation import default_buckets

    settings = parse_settings(args.quant, args.lm_head_fp)
    protocols = _csv(args.protocol)
    if any(p not in PROTOCOLS for p in protocols):
        raise EvalError(f"unknown --protocol {args.protocol!r}; expected a comma list of {', '.join(PROTOCOLS)}")
    if (args.seqlen is not None and args.seqlen < 2) or args.batch_size < 1 or (args.max_tokens is not None and args.max_tokens < 2):
        raise EvalError("--seqlen and --max-tokens must be >= 2, --batch-size >= 1")
    datasets = resolve_ppl_datasets(_csv(args.ppl_datasets))
    files = read_ppl_files(_csv(args.ppl_files), args.doc_split, reserved={d.name for d in datasets})
    tasks = _csv(args.tasks)
    if not files and not datasets and not tasks:
        raise EvalError("nothing to evaluate: give --ppl-files, --ppl-datasets and/or --tasks")
    models = [check_model_spec(spec) for spec in args.model]
    resolve_lengths(models, args, bool(files or datasets), bool(tasks))
    manager = resolve_task_manager(tasks, args.tasks_include, not args.no_builtin_tasks)
    files += read_ppl_datasets(datasets)  # last: the slow download comes after every cheap check
    buckets = sorted(set(([args.seqlen] if files else []) + (list(default_buckets(args.max_length, 64))
                                                               if tasks else [])))
    rows = []
    for spec, source in zip(args.model, models):
        base, tok, name = load_model(source, args.compute_dtype, progress=not args.no_progress)
        windows = {(f.name, p): perplexity_windows(f, tok, p, args) for f in files for p in protocols}
        for setting in settings:
            print(f"[eval] {name} {setting.label}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            row = {"model": name, "path": spec, "quant": setting.label,
                   "numerics": None if setting.quant in EVALUATION_SETTINGS else args.numerics,
                   **evaluate_setting(base, tok, setting, windows, tasks, manager, buckets, args,
                                      label=f"{name}__{setting.label}".replace(":", "_"))}
            rows.append({**row, "seconds": round(time.perf_counter() - start, 1)})
    return rows


def evaluate_setting(base, tokenizer, setting: Setting, windows: dict, tasks: list[str], manager, buckets,
                     args, label: str) -> dict:
    """`compute_dtype`, `ppl` and `tasks` of one setting of one model (one jitted logits function)."""
    from fairy2i_jax.evaluation import jax_logits_fn
    from fairy2i_jax.hf.tokenizer import pad_token_id

    pad_id = pad_token_id(tokenizer)
    model = model_for(base, setting, args.numerics)
    fn = jax_logits_fn(model, buckets=buckets, batch_size=args.batch_size, pad_id=pad_id)
    return {"compute_dtype": str(np.dtype(model.config.compute_dtype)),
            "ppl": perplexity_metrics(fn, windows, args, pad_id),
            "tasks": task_metrics(model, fn, tokenizer, manager, tasks, args, label) if tasks else {}}


def main(argv: list[str] | None = None) -> int:
    """Run `eval.py` with `argv` (default: `sys.argv[1:]`); 0 on success, 2 on a user error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        rows = run(args)
    except Fairy2iError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    from fairy2i_jax.evaluation.report import environment, markdown_table, token_notes

    print(markdown_table(rows) + "\n\n" + token_notes(rows), flush=True)
    if args.json:
        report = {"command": "python eval.py " + shlex.join(argv), **environment(), "args": vars(args),
                  "rows": rows}
        clean, bad = finite_json(report)
        if bad:
            print(f"eval.py: warning: non-finite numbers written as null: {', '.join(bad[:5])}"
                  + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""), file=sys.stderr)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    return 0


def finite_json(tree, path: str = "") -> tuple[object, list[str]]:
    """``(tree with every NaN / inf float replaced by None, the dotted paths replaced)``: strict JSON."""
    if isinstance(tree, float) and not np.isfinite(tree):
        return None, [path or "(root)"]
    if isinstance(tree, dict):
        items = [(k, finite_json(v, f"{path}.{k}" if path else str(k))) for k, v in tree.items()]
        return {k: v for k, (v, _) in items}, [p for _, (_, bad) in items for p in bad]
    if isinstance(tree, (list, tuple)):
        items = [finite_json(v, f"{path}[{i}]") for i, v in enumerate(tree)]
        return [v for v, _ in items], [p for _, bad in items for p in bad]
    return tree, []
