"""Output of `eval.py`: the markdown table, the token counts behind it, and the environment for the JSON.

A row (built by `fairy2i_jax.evaluation.cli.run`) is a dict: `model`, `path`, `quant`, `numerics`,
`compute_dtype`, `seconds`, `ppl` = {file: {protocol: {"ppl", "ppl_official_denominator", "chunks", "tokens",
"scored", "positions", "nll_sum"}}} and `tasks` = {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}}
(a metric a task does not report is None).
"""

from __future__ import annotations

import datetime
import math
import os

TASK_METRICS = ("acc", "acc_norm")  # what the table shows per task (each with its standard error in the JSON)


def fmt(x) -> str:
    """A table cell: "-" for a missing number, 2 decimals below 1e5, else 3 significant digits (1.3e+06)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}" if abs(x) < 1e5 else f"{x:.3g}"


def _pct(metrics: dict, key: str) -> str:
    """``100 x`` the metric ``± 100 x`` its standard error, "-" when the task does not report it."""
    value, err = metrics.get(key), metrics.get(f"{key}_stderr")
    if value is None:
        return "-"
    return f"{100 * value:.2f}" + ("" if err is None or math.isnan(err) else f" ± {100 * err:.2f}")


def markdown_table(rows: list[dict]) -> str:
    """One markdown table: a row per (model, setting), perplexity columns per file and protocol, task acc and
    acc_norm (percent, ± standard error)."""
    ppl_cols, task_cols = [], []
    for row in rows:
        for name, by_protocol in row["ppl"].items():
            for protocol in by_protocol:
                cols = [(name, "official", "ppl_official_denominator"), (name, "official", "ppl")] \
                    if protocol == "official" else [(name, protocol, "ppl")]
                ppl_cols += [c for c in cols if c not in ppl_cols]
        task_cols += [(t, m) for t, found in row["tasks"].items() for m in TASK_METRICS
                      if found.get(m) is not None and (t, m) not in task_cols]
    titles = {"ppl_official_denominator": "official PPL", "ppl": "official PPL per scored token"}
    head = ["model", "quant", "dtype"] + [
        f"{n} {titles[k]}" if p == "official" else f"{n} {p} PPL" for n, p, k in ppl_cols] + [
        f"{t} {m}" for t, m in task_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], row["quant"], row["compute_dtype"]]
        cells += [fmt(row["ppl"].get(n, {}).get(p, {}).get(k)) for n, p, k in ppl_cols]
        cells += [_pct(row["tasks"].get(t, {}), m) for t, m in task_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def token_notes(rows: list[dict]) -> str:
    """One line per (file, protocol): windows and scored tokens (the same for every setting of a model)."""
    seen, notes = set(), []
    for row in rows:
        for name, by_protocol in row["ppl"].items():
            for protocol, m in by_protocol.items():
                key = (row["model"], name, protocol)
                if key not in seen:
                    seen.add(key)
                    notes.append(f"{row['model']} / {name} / {protocol}: {m['chunks']} windows, {m['tokens']} "
                                 f"tokens, {m['scored']} scored targets of {m['positions']} positions")
    return "\n".join(notes)


def environment() -> dict:
    """Date, JAX version, device and CPU count, for the JSON report."""
    import jax

    device = jax.devices()[0]
    return {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "device": f"{device.platform}: {getattr(device, 'device_kind', device)} x{jax.device_count()}",
            "cpu_count": os.cpu_count()}
