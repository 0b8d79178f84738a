"""Header-only reading, the streaming writer, and atomicity."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from cq_core.errors import CqError
from cq_core.io.outputs import partial_files
from cq_core.io.safetensors_io import SafetensorsFile, write_safetensors
from cq_core.plugin.types import TensorSpec
from tests.helpers import write_checkpoint


def test_reader_matches_reference_writer(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int32),
        "c": torch.randn(4).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 3),
    }
    path = write_checkpoint(tmp_path / "x.safetensors", tensors, {"k": "v"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"k": "v"}
        assert set(f.tensors) == set(tensors)
        for name, t in tensors.items():
            got = f.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(torch.uint8), t.view(torch.uint8))


def test_writer_output_loads_in_reference_reader(tmp_path):
    data = {"w": torch.randn(5, 3), "q": torch.randn(2, 2).to(torch.float8_e5m2), "s": torch.tensor(2.0)}
    entries = [(k, TensorSpec(v.dtype, tuple(v.shape))) for k, v in data.items()]
    out = tmp_path / "o.safetensors"
    with write_safetensors(out, entries, {"m": "1"}) as w:
        for k, v in data.items():
            w.write(k, v)
    loaded = load_file(str(out))
    for k, v in data.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k].float(), v.float())
    (header_len,) = struct.unpack("<Q", out.read_bytes()[:8])
    assert header_len % 8 == 0


def test_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    entries = [("a", TensorSpec(torch.float32, (2,))), ("b", TensorSpec(torch.float32, (2,)))]
    with pytest.raises(RuntimeError):
        with write_safetensors(out, entries, {}) as w:
            w.write("a", torch.zeros(2))
            raise RuntimeError("boom")
    assert not out.exists() and not partial_files(out)
    assert list(tmp_path.iterdir()) == []


def test_writer_interrupt_leaves_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with write_safetensors(out, [("a", TensorSpec(torch.float32, (2,)))], {}):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_a_tensor_that_breaks_the_plan(tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(CqError, match="promised"):
        with write_safetensors(out, [("a", TensorSpec(torch.float32, (2,)))], {}) as w:
            w.write("a", torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_unwritten_tensors_and_existing_output(tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(CqError, match="never written"):
        with write_safetensors(out, [("a", TensorSpec(torch.float32, (2,)))], {}):
            pass
    assert not out.exists()
    out.write_bytes(b"x")
    with pytest.raises(CqError, match="already exists"):
        with write_safetensors(out, [], {}):
            pass
    assert out.read_bytes() == b"x"


def _raw_file(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header,data,message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12, "needs 12"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12,
            "overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "malformed shape"),
        ({"a": [1, 2]}, b"", "malformed header entry"),
        ({"__metadata__": {"x": 1}}, b"", "__metadata__"),
        ({"__metadata__": [], "a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}, b"", "__metadata__"),
        ({"a": {"dtype": ["F32"], "shape": [0], "data_offsets": [0, 0]}}, b"", "unknown dtype"),
        ({"a": {"dtype": {"F32": 1}, "shape": [0], "data_offsets": [0, 0]}}, b"", "unknown dtype"),
        ({"a": {}}, b"", "tensor 'a' has no dtype in its header entry"),
        ({"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}, b"", "malformed shape"),
        ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed shape"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed shape"),
        ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [2**64, 2**64]}}, b"", "malformed data offsets"),
        ({"a\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}, b"", "not valid Unicode"),
        ({"__metadata__": {"k": "v\udc00"}}, b"", "not valid Unicode"),
        ({"__metadata__": {"\ud800": "v"}}, b"", "not valid Unicode"),
    ],
)
def test_corrupt_headers_are_one_clear_error(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _raw_file(path, header, data)
    with pytest.raises(CqError, match=message) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty"),
        (b"abc", "only 3 bytes"),
        (struct.pack("<Q", 10**12) + b"{}", "header"),
        (struct.pack("<Q", 50) + b"{}", "truncated"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        # Python refuses to parse integers of more than 4300 digits: still one clear sentence.
        (struct.pack("<Q", 5012) + b'{"a":{"s":' + b"9" * 5000 + b"}}", "not valid JSON"),
        (struct.pack("<Q", 20000) + b"[" * 10000 + b"]" * 10000, "header"),
    ],
)
def test_non_safetensors_files(tmp_path, content, message):
    path = tmp_path / "f.safetensors"
    path.write_bytes(content)
    with pytest.raises(CqError, match=message):
        SafetensorsFile(path)


def test_duplicate_keys_missing_file_and_directory(tmp_path):
    path = tmp_path / "dup.safetensors"
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0")
    with pytest.raises(CqError, match="twice"):
        SafetensorsFile(path)
    with pytest.raises(CqError, match="no such file"):
        SafetensorsFile(tmp_path / "missing.safetensors")
    with pytest.raises(CqError, match="directory"):
        SafetensorsFile(tmp_path)
