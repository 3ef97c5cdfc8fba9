"""The model card (``README.md``) of an export directory, and the training summary of a run directory.

:func:`build_model_card` takes plain data only (the export's ``config.json`` dict, the format, and optionally
the base model's hub id, the run summary of :func:`run_summary`, the preset name and the repo id), so any
caller (the export CLI, the training loop) can write one. The card is::

    ---                                   HF model-card metadata (YAML front matter)
    library_name: transformers
    base_model: org/name                  when known
    pipeline_tag: text-generation
    tags: [fairy2i, quantized, 2-bit, widely-linear, <format>]
    ---
    # title, then: base model, method and bits, scale granularity, stages, the quantized modules (counted, as
    # patterns), the training summary and perplexity of the run (when the source was a run), how to load it
    # (transformers with / without trust_remote_code, fairy2i_jax)

The run summary comes from :func:`fairy2i_jax.runs.run_summary` (steps, tokens, data, lr, losses and the
perplexities the training loop recorded), the keyword arguments for an export from
:func:`fairy2i_jax.sources.card_info`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import yaml

CARD_NAME = "README.md"
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
_BITS = {"complex_phase": 1.0, "binary": 1.0, "ternary": math.log2(3)}  # bits per real weight and stage
_SCALES = {"tensor": "per tensor", "row": "per output row", "group": "per group of {g} inputs"}
_METHOD_TEXT = {
    "complex_phase": "Fairy2i (`complex_phase`): each real linear `A [2n, 2m]` is rewritten exactly as the "
                     "widely-linear complex layer `y = U z + W conj(z)` and `U`, `W` are quantized to phase codes "
                     "{+1, -1, +i, -i} times per-stage scales `(s_re, s_im)`, over T residual stages (each stage "
                     "quantizes the previous stages' residual); the stages are summed and recomposed into the "
                     "real matrix `A_q`.",
    "binary": "`binary`: the real BitNet baseline `mean|w| * sign(w - mean(w))` (a control, not Fairy2i).",
    "ternary": "`ternary`: the real BitNet b1.58 absmean baseline (a control, not Fairy2i).",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def quantized_modules(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{module: entry}`` of the export's quantized linears: ``quantization_config.modules`` (packed) or the
    ``fairy2i.quantization`` note (dequantized, master)."""
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping):
        return dict(qc.get("modules") or {})
    return dict((config.get("fairy2i") or {}).get("quantization") or {})


def bits_per_weight(entry: Mapping[str, Any]) -> float:
    """Storage bits per real weight of one quantized linear's codes: ``stages`` (phase codes, binary) or
    ``1.58 stages`` (ternary); scales excluded."""
    return _BITS.get(entry["method"], 16.0) * entry["stages"]


def _bits_label(bits: float) -> str:
    return f"{bits:g}" if bits == int(bits) else f"{bits:.2f}"


def module_groups(modules: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, int, dict[str, Any]]]:
    """``(pattern, count, spec)`` per distinct (pattern, spec): layer indices become ``*``."""
    keys = ("method", "stages", "numerics", "granularity", "group_size")
    counts: Counter = Counter()
    for name, entry in modules.items():
        spec = tuple((k, entry.get(k)) for k in keys)
        counts[(re.sub(r"\.layers\.\d+\.", ".layers.*.", name), spec)] += 1
    return [(pattern, n, dict(spec)) for (pattern, spec), n in counts.items()]


def guess_base_model(path: str | None) -> str | None:
    """``path`` when it reads as a hub id (``org/name``, not an existing local path), else None."""
    if not path or not _HUB_ID.match(path) or Path(path).expanduser().exists():
        return None
    return path


# ------------------------------------------------------------------------------------------------- card


def _front_matter(base_model: str | None, tags: list[str]) -> str:
    meta: dict[str, Any] = {"library_name": "transformers"}
    if base_model:
        meta["base_model"] = base_model
    meta.update(pipeline_tag="text-generation", tags=tags)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _quant_section(config: Mapping[str, Any], modules: Mapping[str, Mapping[str, Any]], fmt: str) -> list[str]:
    if not modules:
        return ["## Quantization", "", "None: every linear keeps its full-precision weight (an unquantized control "
                "or a real model exported as it is).", ""]
    groups = module_groups(modules)
    layers = config.get("num_hidden_layers", 0)
    total = LINEARS_PER_LAYER * layers + (0 if config.get("tie_word_embeddings") else 1)
    methods = {e["method"] for e in modules.values()}
    lines = ["## Quantization", "", *(_METHOD_TEXT[m] + "\n" for m in sorted(methods) if m in _METHOD_TEXT),
             f"{len(modules)} of the model's {max(total, len(modules))} linears are quantized"
             f"{' (this export holds their masters)' if fmt == 'master' else ''}; embeddings, norms and biases are "
             "kept in full precision.", "",
             "| modules | count | method | bits per weight | stages | scales | numerics |",
             "|---|---|---|---|---|---|---|"]
    for pattern, n, spec in groups:
        scales = _SCALES.get(spec["granularity"], str(spec["granularity"])).format(g=spec["group_size"])
        lines.append(f"| `{pattern}` | {n} | {spec['method']} | {_bits_label(bits_per_weight(spec))} | "
                     f"{spec['stages']} | {scales} | {spec['numerics']} |")
    stored = {"dequantized": "the dequantized matrices `A_q` (exactly what the QAT model multiplies by)",
              "master": "the real master weights (unquantized; quantize them with `fairy2i_jax.convert`)",
              "packed": "the phase codes, 16 per `uint32` word, and the per-stage scales (layout version "
                        f"{(config.get('quantization_config') or {}).get('layout_version')})"}[fmt]
    lines += ["", f"This `{fmt}` export stores {stored}.", ""]
    return lines


def _run_section(run: Mapping[str, Any]) -> list[str]:
    def fmt(v: Any) -> str:
        return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    tokens = run.get("tokens")
    lines = ["## Training", "", f"Quantization-aware training with fairy2i_jax (run `{Path(run['run_dir']).name}`, "
             f"preset `{run.get('preset')}`, from `{run.get('model')}`):", "",
             f"- steps: {fmt(run.get('steps'))} of {fmt(run.get('planned_steps'))}",
             f"- tokens: {'n/a' if tokens is None else f'{tokens:,}'} ({fmt(run.get('global_batch'))} sequences of "
             f"{fmt(run.get('seq_len'))} tokens per step)",
             f"- data: {', '.join(f'`{d}`' for d in run.get('data') or []) or 'n/a'}",
             f"- learning rate: {fmt(run.get('lr'))} peak, schedule `{run.get('schedule')}`, "
             f"{fmt(run.get('final_lr'))} at the last step",
             f"- final training loss: {fmt(run.get('final_loss'))}; held-out loss: {fmt(run.get('eval_loss'))}"]
    ppl = run.get("ppl") or {}
    lines.append("- perplexity at the end of the run: " + (", ".join(f"{v:.3f} ({k})" for k, v in ppl.items())
                                                             if ppl else "not recorded"))
    return lines + [""]


def _load_section(fmt: str, repo: str, stages: int, preset: str | None) -> list[str]:
    transformers_line = {
        "dequantized": f'model = AutoModelForCausalLM.from_pretrained("{repo}")  # plain transformers: no remote code',
        "master": f'model = AutoModelForCausalLM.from_pretrained("{repo}")  # the UNQUANTIZED master weights',
        "packed": f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
    }[fmt]
    lines = ["## Load", "", "transformers (torch):", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', transformers_line, "```", ""]
    if fmt == "packed":
        lines += ["`trust_remote_code=True` runs this directory's `modeling_fairy2i.py` (plain torch, about 200 "
                  "lines): it builds transformers' own model class for the base family and replaces each quantized linear "
                  "by a `Fairy2iLinear` holding the codes and scales. Without it transformers refuses to load the "
                  "directory (`ValueError: ... contains custom code which must be executed ...`). Memory: each "
                  "`Fairy2iLinear` decodes its weight once, at the first forward, into a dense matrix in the "
                  f"activation dtype and keeps it next to the codes ({stages} bits per weight): about the base "
                  f"model's memory in that dtype plus {100 * stages / 16:g}% (bf16) or {100 * stages / 32:g}% (fp32); "
                  "no speed-up.", ""]
    elif fmt == "dequantized":
        lines += ["No `trust_remote_code` needed: the weights are ordinary dense matrices (vLLM and lm-eval load "
                  "them too).", ""]
    else:
        lines += ["No `trust_remote_code` needed. These are the full-precision masters: in transformers they "
                  "give the unquantized model's outputs, not the quantized one's.", ""]
    jax_lines = {"dequantized": f'model = load_pretrained("{repo}")  # a real model with the A_q weights',
                 "master": f'model = convert(load_pretrained("{repo}"), "{preset or "w2"}")  # the QAT model '
                           "back (resume training)",
                 "packed": f'model = load_pretrained("{repo}")  # codes decoded to A_q'}[fmt]
    return lines + ["fairy2i_jax (JAX):", "", "```python", "from fairy2i_jax import convert, load_pretrained", "",
                    jax_lines, "```", ""]


def build_model_card(config: Mapping[str, Any], fmt: str, *, base_model: str | None = None,
                     run: Mapping[str, Any] | None = None, preset: str | None = None,
                     repo_id: str | None = None) -> str:
    """The ``README.md`` text of an export (module docstring). ``config``: the export's ``config.json`` dict;
    ``fmt``: dequantized, master or packed; ``run``: a :func:`run_summary` dict; ``repo_id``: the hub id the
    load snippets name (default: a placeholder path)."""
    if fmt not in ("dequantized", "master", "packed"):
        raise ValueError(f"unknown export format {fmt!r}; expected dequantized, master or packed")
    modules = quantized_modules(config)
    preset = preset or (run or {}).get("preset")
    base_model = base_model or guess_base_model((run or {}).get("model"))
    family = config.get("base_model_type") or config.get("model_type")
    bits = sorted({bits_per_weight(e) for e in modules.values()})
    methods = sorted({e["method"] for e in modules.values()})
    tags = ["fairy2i"] + (["quantized", *(f"{_bits_label(b)}-bit" for b in bits)] if modules else []) + \
        (["widely-linear"] if "complex_phase" in methods or not modules else []) + [fmt]
    label = (f"W{_bits_label(bits[0])}" if methods == ["complex_phase"] and len(bits) == 1
             else ("mixed" if len(methods) > 1 or len(bits) > 1 else methods[0]) if modules else "unquantized")
    scales = {_SCALES[e["granularity"]].format(g=e["group_size"]) for e in modules.values()}
    title = f"{base_model.split('/')[-1] if base_model else family} Fairy2i {label} ({fmt})"
    size = f"{config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, " \
           f"vocab {config.get('vocab_size')}, {'tied' if config.get('tie_word_embeddings') else 'untied'} head"
    lines = [f"# {title}", "",
             f"- base model: {f'[{base_model}](https://huggingface.co/{base_model})' if base_model else 'not recorded'}"
             f" ({family}: {size})",
             f"- method: {', '.join(methods) or 'none'}{f', preset `{preset}`' if preset else ''}; "
             + (f"{', '.join(_bits_label(b) for b in bits)} bits per quantized real weight" if modules
                else "no quantized linears"),
             f"- stages: {', '.join(str(s) for s in sorted({e['stages'] for e in modules.values()})) or 'n/a'}; "
             f"scales: {', '.join(sorted(scales)) or 'n/a'}",
             f"- format: `{fmt}`, tensors in {config.get('dtype')}", "",
             *_quant_section(config, modules, fmt), *(_run_section(run) if run else []),
             *_load_section(fmt, repo_id or "path/to/this/directory",
                            max((e["stages"] for e in modules.values()), default=0), preset),
             "Exported by fairy2i_jax (`python -m fairy2i_jax.export`).", ""]
    return _front_matter(base_model, tags) + "\n" + "\n".join(lines)


def write_model_card(dest: str | Path, config: Mapping[str, Any], fmt: str, **card: Any) -> str:
    """Write :func:`build_model_card` as ``dest/README.md``; returns the file name."""
    (Path(dest) / CARD_NAME).write_text(build_model_card(config, fmt, **card))
    return CARD_NAME
