"""Checkpoint reading, sharded writing and atomic publication of outputs."""

import json

import pytest
import torch
from safetensors.torch import save_file

from compress.checkpoint import CheckpointReader, ShardWriter
from compress.outputs import atomic_output
from compress.errors import CompressError


def test_shards_and_index_round_trip(tmp_path):
    tensors = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(5)}
    writer = ShardWriter(tmp_path, max_shard_bytes=20_000)
    for name, t in tensors.items():
        writer.add(name, t)
    shards = writer.close()
    assert len(shards) == 5 and shards[0].name == "model-00001-of-00005.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    with CheckpointReader(tmp_path) as reader:
        for name, t in tensors.items():
            assert torch.equal(reader.get(name), t)
            assert reader.info(name) == (torch.float32, (64, 64))


def test_single_shard_is_model_safetensors(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add("a", torch.zeros(3))
    assert [p.name for p in writer.close()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_truncated_file_is_a_clear_error(tmp_path):
    save_file({"w": torch.randn(100, 100)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressError, match="truncated"):
        CheckpointReader(tmp_path)


def test_missing_shard_is_a_clear_error(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CompressError, match="missing"):
        CheckpointReader(tmp_path)


def test_no_weights_is_a_clear_error(tmp_path):
    with pytest.raises(CompressError, match="no weights"):
        CheckpointReader(tmp_path)


def test_bin_checkpoints_are_read(tmp_path):
    torch.save({"w": torch.arange(4.0)}, tmp_path / "pytorch_model.bin")
    with CheckpointReader(tmp_path) as reader:
        assert torch.equal(reader.get("w"), torch.arange(4.0))


def test_atomic_output_publishes_on_success(tmp_path):
    out = tmp_path / "result"
    with atomic_output(out) as tmp:
        (tmp / "file").write_text("done")
        assert not out.exists()
    assert (out / "file").read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["result"]


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "result"
    with atomic_output(out) as tmp:
        (tmp / "old").write_text("keep")
    with pytest.raises(CompressError, match="--overwrite"):
        with atomic_output(out):
            pass
    assert (out / "old").read_text() == "keep"
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "new").write_text("n")
    assert sorted(p.name for p in out.iterdir()) == [".compress-output", "new"]
    # a failed overwrite keeps the old result
    with pytest.raises(RuntimeError):
        with atomic_output(out, overwrite=True):
            raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == [".compress-output", "new"]
    assert [p.name for p in tmp_path.iterdir()] == ["result"]
