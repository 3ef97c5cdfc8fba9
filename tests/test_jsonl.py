"""JSON Lines reading: values with their line numbers, gzip, blank lines, and one error naming file and line."""

import gzip

import pytest

from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.jsonl import JsonlError, iter_jsonl


def test_values_and_line_numbers_plain_and_gzipped(tmp_path):
    text = '{"a": 1}\n\n  \n[2, 3]\n"x"\n'
    plain, zipped = tmp_path / "x.jsonl", tmp_path / "x.jsonl.gz"
    plain.write_text(text)
    with gzip.open(zipped, "wt", encoding="utf-8") as f:
        f.write(text)
    want = [(1, {"a": 1}), (4, [2, 3]), (5, "x")]
    assert list(iter_jsonl(plain)) == want and list(iter_jsonl(str(zipped))) == want


def test_a_bad_line_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2,\n')
    with pytest.raises(JsonlError, match=r"metrics\.jsonl:2: not valid JSON \(Expecting") as e:
        list(iter_jsonl(path))
    assert isinstance(e.value, Fairy2iError) and isinstance(e.value, ValueError)
    assert list(iter_jsonl(path, skip_invalid=True)) == [(1, {"step": 1})]
