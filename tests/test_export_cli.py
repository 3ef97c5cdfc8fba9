"""fairy2i_jax.export (``python -m fairy2i_jax.export``): shard sizes, the one-line errors (exit code 2) and the
protection of its own source. (Exports it writes are checked in test_export.py and, of a training run, in
test_loop.py.)"""

import pytest

from fairy2i_jax.export import main as export_main, parse_size
from fairy2i_jax.hf.export import ExportError
from model_helpers import checkpoint


def test_shard_sizes_in_decimal_and_binary_units():
    assert [parse_size(s) for s in ("1000", "5GB", " 500 mb ", "2GiB", "1.5KiB", "3B")] == [
        1000, 5 * 10**9, 500 * 10**6, 2 * 2**30, 1536, 3]
    for bad in ("lots", "5 GBs", "-1GB", ""):
        with pytest.raises(ExportError, match="--max-shard-size .*: expected a size such as 5GB, 500MB or 2GiB"):
            parse_size(bad)


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    source = str(checkpoint("llama"))
    assert export_main(["--from", source, "--out", str(tmp_path / "a"), "--format", "packed"]) == 2
    assert "needs --quant" in capsys.readouterr().err
    assert export_main(["--from", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert export_main(["--from", source, "--quant", "w2", "--out", str(tmp_path / "c"),
                        "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_cli_never_replaces_its_own_source():
    assert export_main(["--from", str(checkpoint("llama")), "--out", str(checkpoint("llama")), "--format",
                        "master", "--overwrite", "--no-progress"]) == 2  # never replaces its own source
