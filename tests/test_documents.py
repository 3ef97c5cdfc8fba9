"""Documents: local text / jsonl / parquet files, HF datasets (streamed from local files), config entries."""

import gzip
import json
import os

import pytest

from data_helpers import files, paras, tok  # noqa: F401 (fixtures)
from fairy2i_jax import data
from fairy2i_jax.data import documents


def test_doc_split_modes(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("Title\n\n\nfirst line\nsecond line\n  \n\nlast para\n", encoding="utf-8")
    assert list(documents.read_documents(p, doc_split="file")) == [
        "Title\n\n\nfirst line\nsecond line\n  \n\nlast para"]
    assert list(documents.read_documents(p, doc_split="paragraph")) == ["Title", "first line\nsecond line",
                                                                        "last para"]
    assert list(documents.read_documents(p, doc_split="line")) == ["Title", "first line", "second line", "last para"]
    with pytest.raises(data.DataError, match="doc_split"):
        list(documents.read_documents(p, doc_split="sentence"))


def test_directory_expands_to_sorted_files(files, paras):
    assert documents.expand_paths(os.path.dirname(files[0])) == sorted(files)
    assert list(documents.read_documents(files, doc_split="paragraph")) == paras[20:95]


def test_jsonl_and_parquet_records(tmp_path, paras):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = paras[100:130]
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs[:10]):
            f.write(json.dumps({"id": i, "body": d}) + "\n")
        f.write("\n")  # blank lines are skipped
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs[10:20])
    pq.write_table(pa.table({"body": docs[20:], "n": list(range(10))}), tmp_path / "c.parquet", row_group_size=3)
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.parquet"]
    assert list(documents.read_documents(paths, text_key="body")) == docs


def test_hf_dataset_streamed_from_local_files(tmp_path, paras):
    """The streaming path an ``hf:`` entry takes (``datasets`` IterableDataset), on the packaged json builder."""
    pytest.importorskip("datasets")
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[:12]), encoding="utf-8")
    got = list(documents.hf_documents("json", data_files=[str(path)], streaming=True, doc_split="line"))
    assert got == [line for p in paras[:12] for line in documents.split_text(p, "line")]


def test_entries_parse_and_refuse_what_they_cannot_read(files, paras):
    assert documents.parse_hf_entry("hf:allenai/c4:en:validation") == documents.HFEntry("allenai/c4", "en",
                                                                                         "validation")
    assert documents.parse_hf_entry("hf:wikitext::test") == documents.HFEntry("wikitext", None, "test")
    assert documents.parse_hf_entry("hf:owner/name") == documents.HFEntry("owner/name", None, "train")
    for bad in ("hf:", "hf::en", "hf:a:b:c:d"):
        with pytest.raises(data.DataError, match="expected hf:NAME"):
            documents.parse_hf_entry(bad)
    assert documents.store_entry_path(["store:/x/y"]) == "/x/y"
    assert documents.store_entry_path(files) is None
    with pytest.raises(data.DataError, match="data.train: a store:DIR entry must be the list's only entry"):
        documents.store_entry_path(["store:/x", files[0]], "data.train")
    # the test machine is offline (conftest): an hf: entry is refused in one line, before anything is read
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(data.DataError, match=r"'hf:allenai/c4:en' streams .* offline \(HF_HUB_OFFLINE=1"):
        documents.entry_documents([files[0], "hf:allenai/c4:en"])
    with pytest.raises(data.DataError, match="is a token store"):
        documents.entry_documents(["store:/x"])
    with pytest.raises(data.DataError, match="nope.txt.*does not exist"):
        documents.entry_documents([files[0], "nope.txt"])  # checked at the call, not at the first document
    assert list(documents.entry_documents(files, doc_split="paragraph")) == paras[20:95]


def test_error_missing_file_and_extension(tmp_path):
    with pytest.raises(data.DataError, match="nope.txt.*does not exist"):
        documents.expand_paths(str(tmp_path / "nope.txt"))
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(data.DataError, match=r"t\.csv.*unsupported extension"):
        documents.expand_paths(tmp_path / "t.csv")
    with pytest.raises(data.DataError, match="no file with a supported extension"):
        documents.expand_paths(tmp_path)


def test_error_jsonl_missing_key_and_bad_json(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "fine"}\n{"content": "no text key"}\n')
    with pytest.raises(data.DataError, match=r"x\.jsonl:2: record has no 'text' key"):
        list(documents.read_documents(p))
    p.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:3: not valid JSON"):
        list(documents.read_documents(p))


def test_error_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "p.parquet")
    with pytest.raises(data.DataError, match=r"p\.parquet.*no 'text' column"):
        list(documents.read_documents(tmp_path / "p.parquet"))
