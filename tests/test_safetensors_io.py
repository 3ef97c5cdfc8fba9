"""fairy2i_jax.hf.safetensors_io: the streaming writer (files that the safetensors library and our reader read
back, shard plans, refusals) and the reader's refusals of corrupt, truncated, incomplete or pickled checkpoints
(on copies of a whole tiny checkpoint, through load_pretrained where that is how a user meets them)."""

import json
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from fairy2i_jax import CheckpointError, load_pretrained
from fairy2i_jax.hf.safetensors_io import (
    SafetensorsCheckpoint,
    TensorPlan,
    read_header,
    shard_plan,
    write_safetensors,
    write_sharded,
)
from model_helpers import checkpoint


def _plan(name, array):
    return TensorPlan(name, array.shape, array.dtype, lambda: array)


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b.weight": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
        "c.codes": rng.integers(0, 2**32, size=(2, 3, 1), dtype=np.uint32),
        "d.scalar": np.asarray(1.5, np.float32),
        "e.empty": np.zeros((0, 4), np.float32),
    }


def test_written_file_reads_back_with_the_safetensors_library(tmp_path):
    arrays = _arrays()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, [_plan(k, v) for k, v in arrays.items()])
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        for name in ("a.weight", "c.codes", "d.scalar", "e.empty"):
            np.testing.assert_array_equal(f.get_tensor(name), arrays[name])
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0
    assert set(read_header(path)) == set(arrays)
    reader = SafetensorsCheckpoint(tmp_path)
    assert reader.read("b.weight").tobytes() == arrays["b.weight"].tobytes()  # BF16 through our reader


def test_shards_and_index(tmp_path):
    arrays = _arrays()
    plans = [_plan(k, v) for k, v in arrays.items()]
    reported = []
    files = write_sharded(tmp_path, plans, max_shard_bytes=60, on_tensor=lambda t: reported.append(t.name))
    assert reported == list(arrays)
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # [a 60 B] [b c d e]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in arrays.values())
    reader = SafetensorsCheckpoint(tmp_path)
    for name, value in arrays.items():
        assert reader.read(name).tobytes() == value.tobytes(), name


def test_shard_plan_rules():
    """HF's splitting rule (huggingface_hub): an oversized tensor stands alone, the others fill shards in order."""
    big, small = np.zeros(100, np.float32), np.zeros(10, np.float32)
    shards = shard_plan([_plan("s1", small), _plan("big", big), _plan("s2", small)], max_shard_bytes=200)
    assert {f: [t.name for t in s] for f, s in shards.items()} == {
        "model-00001-of-00002.safetensors": ["big"], "model-00002-of-00002.safetensors": ["s1", "s2"]}
    assert list(shard_plan([_plan("s1", small)])) == ["model.safetensors"]
    with pytest.raises(ValueError, match="'s1' planned twice"):
        shard_plan([_plan("s1", small), _plan("s1", small)])
    with pytest.raises(ValueError, match="no safetensors name"):
        shard_plan([_plan("c", np.zeros(2, np.complex64))])


def test_a_tensor_that_does_not_match_its_plan_is_refused(tmp_path):
    plan = TensorPlan("w", (2, 2), np.dtype(np.float32), lambda: np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"tensor 'w': produced float32\[2, 3\], planned float32\[2, 2\]"):
        write_safetensors(tmp_path / "x.safetensors", [plan])


# -- reading refusals ------------------------------------------------------------------------------------------


def _corrupt(tmp_path, mutate):
    path = shutil.copytree(checkpoint("llama"), tmp_path / "ckpt")
    file = path / "model.safetensors"
    file.write_bytes(mutate(file.read_bytes()))
    return path


def test_header_length_beyond_file_is_refused(tmp_path):
    path = _corrupt(tmp_path, lambda b: struct.pack("<Q", len(b) * 2) + b[8:])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated safetensors file.*header"):
        load_pretrained(path)


def test_bad_header_json_is_refused(tmp_path):
    def garble(b):
        n = struct.unpack("<Q", b[:8])[0]
        return b[:8] + b"{" * n + b[8 + n:]

    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated safetensors file.*JSON"):
        load_pretrained(_corrupt(tmp_path, garble))


def test_truncated_data_is_refused(tmp_path):
    path = _corrupt(tmp_path, lambda b: b[: len(b) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated safetensors file.*not fully covered"):
        load_pretrained(path)


def test_missing_shard_is_refused(tmp_path):
    path = shutil.copytree(checkpoint("llama", "float32", "60KB"), tmp_path / "ckpt")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard file\\(s\\) \\['{shard}'\\] listed in the index do not exist"):
        SafetensorsCheckpoint(path)


def test_pickled_weights_are_never_loaded(tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(checkpoint("llama") / "config.json", path / "config.json")
    payload = path / "pytorch_model.bin"
    payload.write_bytes(b"not even opened")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*pickled checkpoints are never loaded.*safetensors"):
        load_pretrained(path)
    assert payload.read_bytes() == b"not even opened"
