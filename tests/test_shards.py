"""Sharded checkpoints: an index and its shards in, a shard set and a matching index out."""

from __future__ import annotations

import json

import pytest
import torch

import cq_core
from cq_core.errors import CqError, UsageError
from cq_core.io.safetensors_io import StreamingWriter
from cq_core.io.shards import split_groups
from cq_core.io.sizes import parse_size
from cq_core.plugin.types import TensorSpec
from tests.cli_runner import run_cq
from tests.comfy import LAYOUTS, comfy_dequantize
from tests.helpers import load, six_blocks, write_checkpoint, write_sharded

HEADER_KEY = "_quantization_metadata"


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def load_set(index_path):
    """All tensors of a shard set, checking the index against the shards' own headers."""
    index = json.loads(index_path.read_text())
    tensors, per_shard = {}, {}
    for shard in sorted(set(index["weight_map"].values())):
        part, metadata = load(index_path.parent / shard)
        assert all(index["weight_map"][name] == shard for name in part)
        per_shard[shard] = (part, metadata)
        tensors.update(part)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors, per_shard


def check_layers_decode(tensors, source):
    """Every quantized layer decodes in comfy-kitchen to (close to) its source weight."""
    layers = [n.removesuffix(".weight") for n in source if n.endswith("attn.weight")]
    for layer in layers:
        weight = source[f"{layer}.weight"].float()
        decoded = comfy_dequantize(
            LAYOUTS["float8_e4m3fn"], tensors[f"{layer}.weight"], weight.shape, scale=tensors[f"{layer}.weight_scale"]
        ).float()
        assert (decoded - weight).norm() / weight.norm() < 0.05, layer


def test_index_in_sharded_out_mirrors_the_input_shards(tmp_path):
    source = six_blocks()
    index = write_sharded(tmp_path, source)
    report = cq_core.convert(index, model="none")
    out_index = tmp_path / "model-float8_e4m3fn.safetensors.index.json"
    assert report.output == str(out_index)
    tensors, per_shard = load_set(out_index)
    assert sorted(per_shard) == [f"model-float8_e4m3fn-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    check_layers_decode(tensors, source)
    for name, value in source.items():
        if not name.endswith("attn.weight"):
            assert torch.equal(tensors[name], value), name
    # each shard's header names exactly its own layers, as the per-layer tensors say
    for part, metadata in per_shard.values():
        own = {n.removesuffix(".comfy_quant") for n in part if n.endswith(".comfy_quant")}
        header = json.loads(metadata[HEADER_KEY])["layers"] if HEADER_KEY in metadata else {}
        assert set(header) == own and own
        assert metadata["format"] == "pt"


def test_sharded_and_single_file_outputs_hold_the_same_bytes(tmp_path):
    source = six_blocks()
    index = write_sharded(tmp_path, source)
    cq_core.convert(index, tmp_path / "set.safetensors", model="none")
    cq_core.convert(index, tmp_path / "one.safetensors", model="none", single_file=True)
    sharded, _ = load_set(tmp_path / "set.safetensors.index.json")
    single, metadata = load(tmp_path / "one.safetensors")
    assert sharded.keys() == single.keys()
    for name in single:
        assert torch.equal(as_bytes(sharded[name]), as_bytes(single[name])), name
    assert len(json.loads(metadata[HEADER_KEY])["layers"]) == 6
    # converting the original single file gives the same bytes again
    whole = write_checkpoint(tmp_path / "whole.safetensors", source, {"format": "pt"})
    cq_core.convert(whole, tmp_path / "from-whole.safetensors", model="none")
    again, _ = load(tmp_path / "from-whole.safetensors")
    for name in single:
        assert torch.equal(as_bytes(again[name]), as_bytes(single[name])), name


def test_a_directory_of_shards_is_one_model(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    source = six_blocks()
    write_sharded(folder, source, shards=2, index=False)
    report = cq_core.convert(folder, model="none")
    # Beside the folder, named after it: inside, its index would make the folder two models.
    out_index = tmp_path / "ckpt-float8_e4m3fn.safetensors.index.json"
    assert report.output == str(out_index)
    tensors, per_shard = load_set(out_index)
    assert len(per_shard) == 2
    check_layers_decode(tensors, source)
    assert sorted(p.name for p in folder.iterdir()) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    again = cq_core.convert(folder, model="none", format="nvfp4", single_file=True)
    assert again.output == str(tmp_path / "ckpt-nvfp4.safetensors")


def test_max_shard_size_splits_a_single_file_and_keeps_layers_whole(tmp_path):
    source = six_blocks()
    path = write_checkpoint(tmp_path / "model.safetensors", source)
    limit = 10_000
    cq_core.convert(path, tmp_path / "out.safetensors", model="none", max_shard_size=limit)
    tensors, per_shard = load_set(tmp_path / "out.safetensors.index.json")
    assert len(per_shard) >= 3
    for part, _ in per_shard.values():
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= limit
        layers = {n.rsplit(".", 1)[0] for n in part if n.endswith(".comfy_quant")}
        for layer in layers:  # weight, scales and metadata of a layer share a shard
            assert {f"{layer}.weight", f"{layer}.weight_scale", f"{layer}.input_scale"} <= part.keys()
    check_layers_decode(tensors, source)


def test_cli_max_shard_size(capsys, tmp_path):
    path = write_checkpoint(tmp_path / "model.safetensors", six_blocks())
    result = run_cq(capsys, "convert", path, "-o", tmp_path / "o.safetensors", "--max-shard-size", "30KB", "-q",
                    "--model", "none")
    assert result.code == 0, result.err
    assert (tmp_path / "o.safetensors.index.json").exists()
    result = run_cq(capsys, "convert", path, "--max-shard-size", "lots", "-o", tmp_path / "p.safetensors")
    assert result.code == 2 and "--max-shard-size" in result.err


def test_failure_midway_leaves_no_shards_and_no_index(tmp_path, monkeypatch):
    index = write_sharded(tmp_path, six_blocks())
    before = sorted(p.name for p in tmp_path.iterdir())
    real_write = StreamingWriter.write
    calls = []

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 20:  # inside the second shard: the first is complete by now
            raise OSError(28, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(StreamingWriter, "write", failing_write)
    with pytest.raises(CqError, match="No space left"):
        cq_core.convert(index, model="none")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_failure_while_renaming_removes_the_shards_already_renamed(tmp_path, monkeypatch):
    index = write_sharded(tmp_path, six_blocks())
    before = sorted(p.name for p in tmp_path.iterdir())
    import cq_core.io.outputs as outputs

    real_link = outputs.os.link
    renames = []

    def failing_link(src, dst, **kwargs):  # new outputs are renamed by a no-replace link
        renames.append(dst)
        if len(renames) == 3:
            raise OSError(5, "Input/output error")
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(outputs.os, "link", failing_link)
    with pytest.raises(CqError, match="Input/output error"):
        cq_core.convert(index, model="none")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_outputs_are_refused_and_overwrite_drops_stale_shards(tmp_path):
    index = write_sharded(tmp_path, six_blocks())
    out = tmp_path / "q.safetensors.index.json"
    cq_core.convert(index, out, model="none", max_shard_size=10_000)
    many = sorted(tmp_path.glob("q-*.safetensors"))
    assert len(many) > 3
    with pytest.raises(CqError, match="already exists"):
        cq_core.convert(index, out, model="none", max_shard_size=10_000)
    cq_core.convert(index, out, model="none", overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("q-*.safetensors")) == [
        f"q-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    load_set(out)


# -- bad sharded input -------------------------------------------------------------------------


def test_missing_shard_is_named(tmp_path):
    index = write_sharded(tmp_path, six_blocks())
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CqError, match="model-00002-of-00003.safetensors.*missing"):
        cq_core.convert(index)


def test_index_that_misplaces_a_tensor_is_refused(tmp_path):
    index = write_sharded(tmp_path, six_blocks())
    body = json.loads(index.read_text())
    body["weight_map"]["blocks.0.attn.weight"] = "model-00003-of-00003.safetensors"
    index.write_text(json.dumps(body))
    with pytest.raises(CqError, match="blocks.0.attn.weight"):
        cq_core.convert(index)


def test_index_listing_a_tensor_no_shard_has_is_refused(tmp_path):
    index = write_sharded(tmp_path, six_blocks())
    body = json.loads(index.read_text())
    body["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(body))
    with pytest.raises(CqError, match="ghost.weight"):
        cq_core.convert(index)


@pytest.mark.parametrize(
    "text,match",
    [("not json", "not readable JSON"), ('{"weight_map": {}}', "weight_map"),
     ('{"weight_map": {"a": "../x.safetensors"}}', "plain file name")],
)
def test_malformed_index_is_refused(tmp_path, text, match):
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(CqError, match=match):
        cq_core.convert(index)


def test_directory_with_two_models_is_refused(tmp_path):
    write_sharded(tmp_path, six_blocks(), stem="a", index=False)
    write_sharded(tmp_path, six_blocks(), shards=2, stem="b", index=False)
    with pytest.raises(CqError, match="different models"):
        cq_core.convert(tmp_path)


def test_directory_missing_a_shard_without_index_is_refused(tmp_path):
    write_sharded(tmp_path, six_blocks(), index=False)
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CqError, match="shard 3 of 3"):
        cq_core.convert(tmp_path)


def test_single_file_and_max_shard_size_contradict(tmp_path):
    path = write_checkpoint(tmp_path / "model.safetensors", six_blocks())
    with pytest.raises(UsageError, match="--single-file"):
        cq_core.convert(path, single_file=True, max_shard_size="1GB")


@pytest.mark.parametrize(
    "text,size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1000", 1000), ("1.5 kb", 1500)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1GB", "5 parsecs"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="--max-shard-size"):
        parse_size(text)


def test_split_groups_by_size_and_by_input_shard():
    spec = TensorSpec(torch.uint8, (10,))
    groups = [[("a", spec)], [("b", spec), ("c", spec)], [], [("d", spec)], [("e", spec)]]
    assert split_groups(groups, max_bytes=20) == [[0], [1, 2], [3, 4]]
    assert split_groups(groups, max_bytes=5) == [[0], [1, 2], [3], [4]]  # an oversized group stands alone
    assert split_groups(groups, shard_keys=[0, 0, 1, 1, 2]) == [[0, 1, 2], [3], [4]]
