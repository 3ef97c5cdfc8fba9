"""fairy2i_jax.evaluation.report: the markdown table and token notes of two hand-made eval rows, cell formats,
and the environment record of the JSON report."""

import jax

from fairy2i_jax.evaluation.report import environment, fmt, markdown_table, token_notes


def _ppl(ppl, official=None, chunks=3, tokens=300, scored=290, positions=297):
    m = {"ppl": ppl, "chunks": chunks, "tokens": tokens, "scored": scored, "positions": positions, "nll_sum": 1.0}
    if official is not None:
        m["ppl_official_denominator"] = official
    return m


ROWS = [
    {"model": "tiny", "path": "/m", "quant": "fp", "numerics": "bf16_exact", "compute_dtype": "float32",
     "seconds": 1.0,
     "ppl": {"wiki": {"official": _ppl(12.345, 11.5), "contiguous": _ppl(250000.0, chunks=2, tokens=256,
                                                                          scored=254, positions=254)}},
     "tasks": {"piqa": {"acc": 0.61234, "acc_stderr": 0.0123, "acc_norm": None, "acc_norm_stderr": None}}},
    {"model": "tiny", "path": "/m", "quant": "w2", "numerics": "bf16_exact", "compute_dtype": "bfloat16",
     "seconds": 2.0,
     "ppl": {"wiki": {"official": _ppl(20.0, float("nan"))}},
     "tasks": {"piqa": {"acc": 0.5, "acc_stderr": None, "acc_norm": 0.55, "acc_norm_stderr": 0.02}}},
]


def test_markdown_table_of_two_rows():
    lines = markdown_table(ROWS).splitlines()
    assert lines[0] == ("| model | quant | dtype | wiki official PPL | wiki official PPL per scored token | "
                        "wiki contiguous PPL | piqa acc | piqa acc_norm |")
    assert lines[1] == "|" + "---|" * 8
    assert lines[2] == "| tiny | fp | float32 | 11.50 | 12.35 | 2.5e+05 | 61.23 ± 1.23 | - |"
    assert lines[3] == "| tiny | w2 | bfloat16 | - | 20.00 | - | 50.00 | 55.00 ± 2.00 |"
    assert len(lines) == 4


def test_cells_notes_and_environment():
    assert [fmt(x) for x in (None, float("nan"), 3.14159, 99999.0, 123456.0)] == ["-", "-", "3.14", "99999.00",
                                                                                    "1.23e+05"]
    assert token_notes(ROWS).splitlines() == [
        "tiny / wiki / official: 3 windows, 300 tokens, 290 scored targets of 297 positions",
        "tiny / wiki / contiguous: 2 windows, 256 tokens, 254 scored targets of 254 positions",
    ]  # the same (model, file, protocol) once, though two rows report it
    env = environment()
    assert set(env) == {"date", "jax", "device", "cpu_count"} and env["jax"] == jax.__version__
    device = jax.devices()[0]
    assert env["device"] == f"{device.platform}: {device.device_kind} x{jax.device_count()}"
