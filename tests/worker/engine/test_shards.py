"""Shards written one tensor at a time: sizes, names, the index, and from_pretrained reading them."""

import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from app.safetensors_header import read_header
from tests.worker.conftest import tiny_llama
from worker.engine.modules import unique_tensors
from worker.engine.shards import INDEX_FILE, ShardWriter


def read_all(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as file:
            tensors.update({name: file.get_tensor(name) for name in file.keys()})
    return tensors


def test_several_shards_with_an_index_that_from_pretrained_loads(tmp_path):
    model = tiny_llama()
    tensors = unique_tensors(model)
    max_bytes = 100_000
    with ShardWriter(tmp_path, max_bytes) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    model.config.save_pretrained(tmp_path)

    files = sorted(tmp_path.glob("*.safetensors"))
    count = len(files)
    assert count > 2
    assert [f.name for f in files] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    # The file, header included, never exceeds the limit (no single tensor here is that large).
    assert all(f.stat().st_size <= max_bytes for f in files)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == {f.name for f in files}
    assert not list(tmp_path.glob(".shard-*"))  # no temporary file left
    written = read_all(tmp_path)
    assert written.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(written[name], tensor), name

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_one_shard_is_model_safetensors_without_an_index(tmp_path):
    tensors = unique_tensors(tiny_llama())
    with ShardWriter(tmp_path, 10**9) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    assert [f.name for f in tmp_path.iterdir()] == ["model.safetensors"]
    assert read_all(tmp_path).keys() == tensors.keys()


def test_no_file_exceeds_the_limit_and_a_larger_tensor_is_alone(tmp_path):
    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(4)}  # 1000 bytes each
    for limit in range(1000, 5000, 100):
        folder = tmp_path / str(limit)
        with ShardWriter(folder, limit) as writer:
            for name, tensor in tensors.items():
                writer.add(name, tensor)
        written = read_all(folder)
        assert all(torch.equal(written[name], tensor) for name, tensor in tensors.items())
        for path in folder.glob("*.safetensors"):  # over the limit only when one tensor is
            with safe_open(path, "pt") as file:
                assert path.stat().st_size <= limit or len(file.keys()) == 1, limit
    assert len(list((tmp_path / "4900").glob("*.safetensors"))) == 1

    with ShardWriter(tmp_path / "big", 500) as writer:
        writer.add("small", torch.zeros(10))
        writer.add("large", torch.zeros(1000))  # 4000 bytes: more than a shard, a file of its own
        writer.add("after", torch.zeros(10))
    weight_map = json.loads((tmp_path / "big" / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) == 3


def test_nothing_is_held_once_written(tmp_path):
    with ShardWriter(tmp_path, 10**6) as writer:
        tensor = torch.zeros(300)
        written = weakref.ref(tensor)
        writer.add("t", tensor)
        del tensor
        assert written() is None  # already in the file, not kept


def test_a_header_larger_than_its_room_still_makes_a_valid_file(tmp_path):
    tensors = {f"a_rather_long_tensor_name_{i:04d}": torch.full((2,), float(i)) for i in range(300)}
    with ShardWriter(tmp_path, 10**6) as writer:  # 300 entries: ~27 KB of header, 15 KB of room
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    assert [f.name for f in tmp_path.iterdir()] == ["model.safetensors"]
    written = read_all(tmp_path)
    assert all(torch.equal(written[name], tensor) for name, tensor in tensors.items())


def test_a_failure_leaves_no_weights_file(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "artifact", 1000) as writer:
            for i in range(5):
                writer.add(f"t{i}", torch.zeros(200))
            raise RuntimeError("stage failed")
    assert list(tmp_path.iterdir()) == []  # the folder it made is gone too


def test_a_name_is_written_once(tmp_path):
    writer = ShardWriter(tmp_path, 1000)
    writer.add("a", torch.zeros(1))
    with pytest.raises(ValueError, match="already"):
        writer.add("a", torch.zeros(1))


def test_a_layout_fixes_each_tensors_place_whatever_order_they_come_in(tmp_path):
    tensors = unique_tensors(tiny_llama())
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "reference.safetensors", max_header_bytes=10**6)
    stored_order = sorted(header.tensors, key=lambda name: header.tensors[name].begin)
    layout = [(name, tensors[name].dtype, tuple(tensors[name].shape)) for name in stored_order]

    with ShardWriter(tmp_path / "laid_out", 10**9, layout=layout) as writer:
        for name in reversed(list(tensors)):
            writer.add(name, tensors[name])
    # Byte for byte the file safetensors writes: the same header, the same data.
    assert (tmp_path / "laid_out" / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()

    with ShardWriter(tmp_path / "sharded", 100_000, layout=layout) as writer:
        for name in reversed(list(tensors)):
            writer.add(name, tensors[name])
    assert len(writer.files) > 2 and all(f.stat().st_size <= 100_000 for f in writer.files)
    written = read_all(tmp_path / "sharded")
    assert all(torch.equal(written[name], tensor) for name, tensor in tensors.items())

    writer = ShardWriter(tmp_path / "incomplete", 10**9, layout=layout)
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    with pytest.raises(ValueError, match="layout has"):
        writer.add(layout[0][0], torch.zeros(1))
