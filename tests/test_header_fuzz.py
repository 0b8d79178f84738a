"""Structured fuzzing of the header, field by field, through the real ``cq`` entry point.

Byte mutations (test_reliability.py) mostly break the JSON and stop at the
first check. Here each example is a well-formed file with one field replaced:
a shape entry, a dtype, the data offsets, a tensor name, ``__metadata__``, a
layer's ``comfy_quant`` JSON or the ``_quantization_metadata`` header, by
values of every JSON type, 5000-digit integers, lone surrogates, empty and
huge names. Every command then runs on it, and for each:

- no traceback (``run_cq`` lets any non-``CqError`` exception through);
- a failure is exactly one line on stderr and leaves no file behind;
- a mutation that certainly breaks the file fails every command that only
  reads it (the editors ``cq meta sync``/``set`` may repair per-layer JSON,
  and then their output must be a valid file);
- an output written with exit 0 is a valid file for ``cq inspect``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cq_core.io.safetensors_io import DTYPES
from tests.cli_runner import run_cq

#: Stands for an integer of 5000 digits, which Python can neither print nor parse by default.
BIGINT = "\x00BIGINT\x00"
SURROGATES = ("\ud800", "a\udc00b", "\udfff" * 3)
LAYER = "blocks.0.fc"
HEADER_KEY = "_quantization_metadata"


@dataclass
class Entry:
    dtype: str
    shape: list
    data: bytes


def _entry(tensor: torch.Tensor, dtype: str) -> Entry:
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return Entry(dtype, list(tensor.shape), raw)


def source_entries() -> dict[str, Entry]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{LAYER}.weight": _entry(torch.randn(32, 64, generator=g), "F32"),
        f"{LAYER}.bias": _entry(torch.randn(32, generator=g), "F32"),
        "norm.weight": _entry(torch.ones(64), "F32"),
        "empty.weight": _entry(torch.zeros(0, 64), "F32"),
    }


def quantized_entries() -> tuple[dict[str, Entry], dict[str, str]]:
    """What cq writes for source_entries() in float8_e4m3fn, built by hand."""
    entries = source_entries()
    weight = torch.frombuffer(bytearray(entries[f"{LAYER}.weight"].data), dtype=torch.float32).reshape(32, 64)
    scale = weight.abs().amax() / 448
    config = json.dumps({"format": "float8_e4m3fn"}, separators=(",", ":")).encode()
    entries[f"{LAYER}.weight"] = _entry((weight / scale).to(torch.float8_e4m3fn), "F8_E4M3")
    entries[f"{LAYER}.weight_scale"] = _entry(scale.reshape(()), "F32")
    entries[f"{LAYER}.input_scale"] = _entry(torch.tensor(1.0), "F32")
    entries[f"{LAYER}.comfy_quant"] = Entry("U8", [len(config)], config)
    header = {HEADER_KEY: json.dumps({"format_version": "1.0", "layers": {LAYER: {"format": "float8_e4m3fn"}}})}
    return entries, header


def render(header: dict) -> bytes:
    """The header JSON, with BIGINT placeholders as 5000-digit integers and surrogates escaped."""
    text = json.dumps(header)  # ensure_ascii: a lone surrogate becomes a \\udxxx escape
    return text.replace(json.dumps(BIGINT), "9" * 5000).encode()


def build(entries: dict[str, Entry], metadata: object, fields: dict | None = None) -> bytes:
    """A file from ``entries`` laid out in order, then ``fields`` (name -> replacement entry dict,
    or None to leave it) applied to the header as JSON values."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset, data = 0, b""
    for name, entry in entries.items():
        header[name] = {"dtype": entry.dtype, "shape": entry.shape, "data_offsets": [offset, offset + len(entry.data)]}
        offset += len(entry.data)
        data += entry.data
    for name, value in (fields or {}).items():
        header[name] = value
    raw = render(header)
    return struct.pack("<Q", len(raw)) + raw + data


# -- strategies ----------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.just(BIGINT)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(SURROGATES)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
dims = st.integers(-3, 70) | st.integers(2**62, 2**66) | st.just(BIGINT) | st.floats() | st.booleans() | \
    st.text(max_size=3) | st.none()
names = st.sampled_from(["", "a" * 100_000, "x\ny", "__metadata__", *SURROGATES]) | st.text(max_size=12)


def _itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _is_dim(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


@st.composite
def tensor_field(draw, entries: dict[str, Entry]):
    """(fields, entries, certainly broken) for one field of one tensor replaced."""
    name = draw(st.sampled_from(sorted(entries)))
    entry = entries[name]
    nbytes = len(entry.data)
    offsets = _offsets(entries)[name]
    field = draw(st.sampled_from(["shape", "dtype", "data_offsets", "name", "entry"]))
    value = {"dtype": entry.dtype, "shape": entry.shape, "data_offsets": offsets}
    if field == "shape":
        shape = draw(st.lists(dims, max_size=4) | json_values)
        value["shape"] = shape
        valid = isinstance(shape, list) and all(_is_dim(d) for d in shape) and \
            _numel(shape) * _itemsize(entry.dtype) == nbytes
        return {name: value}, entries, not valid
    if field == "dtype":
        dtype = draw(st.sampled_from(sorted(DTYPES)) | json_values)
        value["dtype"] = dtype
        valid = isinstance(dtype, str) and dtype in DTYPES and _numel(entry.shape) * _itemsize(dtype) == nbytes
        return {name: value}, entries, not valid
    if field == "data_offsets":
        total = sum(len(e.data) for e in entries.values())
        bound = st.integers(-3, total + 3) | st.integers(2**63 - 2, 2**64 + 1) | st.just(BIGINT)
        pair = st.lists(bound, min_size=2, max_size=2)
        value["data_offsets"] = draw(pair | st.lists(bound, max_size=3) | json_values)
        return {name: value}, entries, None  # moved offsets may still describe a valid file
    if field == "entry":
        return {name: draw(json_values)}, entries, True
    new = draw(names)
    renamed = {(new if n == name else n): e for n, e in entries.items()}
    if len(renamed) < len(entries) or new == "__metadata__" or new in SURROGATES:
        # A duplicate or reserved name, or a lone surrogate: build the header by hand below.
        return {"__rename__": (name, new)}, entries, True
    return {}, renamed, None


def _offsets(entries: dict[str, Entry]) -> dict[str, list[int]]:
    out, offset = {}, 0
    for name, entry in entries.items():
        out[name] = [offset, offset + len(entry.data)]
        offset += len(entry.data)
    return out


@st.composite
def metadata_field(draw):
    """(metadata, certainly broken) for __metadata__ replaced."""
    kind = draw(st.sampled_from(["value", "key", "whole", "quantization header"]))
    if kind == "quantization header":  # stale or garbage: convert must not copy it to its output
        stale = json.dumps({"format_version": "1.0", "layers": {LAYER: {"format": "nvfp4"}}})
        return {HEADER_KEY: draw(st.sampled_from([stale, "{nope", "[]"]) | st.text(max_size=8))}, False
    if kind == "whole":
        value = draw(json_values)
        return value, not (value is None or (isinstance(value, dict) and _str_to_str(value)))
    if kind == "key":
        return {draw(st.sampled_from(SURROGATES)): "v"}, True
    value = draw(json_values)
    return {"k": value}, not (isinstance(value, str) and _unicode(value))


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return BIGINT not in text


def _str_to_str(mapping: dict) -> bool:
    return all(isinstance(v, str) and _unicode(k) and _unicode(v) for k, v in mapping.items())


#: Layer JSON that is certainly unusable, and some that is fine.
BAD_LAYER_JSON = (
    st.binary(max_size=24).filter(lambda b: not _json_object_with_format(b))
    | json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: render(v))
    | st.dictionaries(st.sampled_from(["format", "full_precision_matrix_mult", "group_size"]), json_values, max_size=3)
    .filter(lambda d: not _valid_config(d))
    .map(render)
)
GOOD_LAYER_JSON = st.sampled_from([b'{"format":"float8_e4m3fn"}', b'{"format": "float8_e4m3fn", "note": "x"}'])


def _json_object_with_format(raw: bytes) -> bool:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and "format" in value


def _valid_config(config: dict) -> bool:
    if not isinstance(config.get("format"), str) or not _unicode(config["format"]):
        return False
    if "full_precision_matrix_mult" in config and type(config["full_precision_matrix_mult"]) is not bool:
        return False
    group = config.get("group_size", 1)
    return type(group) is int and 0 < group < 2**31


# -- the commands ----------------------------------------------------------------------------------


def source_commands(path: Path, out: Path, quantized: Path):
    return [
        (("convert", path, "-o", out, "-q"), out),
        (("convert", path, "--dry-run"), None),
        (("convert", path, "-o", out, "-f", "nvfp4", "-q"), out),
        (("inspect", path), None),
        (("verify", path, quantized), None),
    ]


def quantized_commands(path: Path, source: Path, out: Path):
    """(arguments, output or None, may repair per-layer JSON)."""
    return [
        (("inspect", path), None, False),
        (("meta", "show", path), None, False),
        (("verify", source, path), None, False),
        (("migrate", path, "--check"), None, False),
        (("migrate", path, "-o", out), out, False),
        (("meta", "sync", path, "-o", out), out, True),
        (("meta", "sync", path, "--from", "header", "-o", out), out, True),
        (("meta", "set", path, "format=float8_e4m3fn", "-o", out), out, True),
        (("meta", "unset", path, "full_precision_matrix_mult", "-o", out), out, False),
    ]


def _check(capsys, args, out: Path | None, folder: Path, inputs: set[str], broken: bool = False):
    result = run_cq(capsys, *args)
    leftovers = {p.name for p in folder.iterdir()} - inputs
    if result.code == 1 and args[0] == "migrate" and "--check" in args and not result.err and not broken:
        pass  # "needs migrating": the report is on stdout, like a linter's --check
    elif result.code != 0:
        lines = result.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("cq: "), (args[0], result.err[:2000])
        assert not leftovers, (args[0], leftovers)
    elif out is not None and out.exists():
        written = run_cq(capsys, "inspect", out)
        assert written.code == 0, (args[0], "wrote a file cq cannot read back", written.err)
        for name in leftovers:
            (folder / name).unlink()
    return result


@pytest.fixture(autouse=True)
def click_command_built_once(monkeypatch):
    """Typer rebuilds its click command from signatures on every call (most of a small
    command's time); hundreds of runs here build it once. Entry point and error
    handling are still cq's own ``main``."""
    import typer.main

    build_command, built = typer.main.get_command, {}

    def get_command(app):
        if id(app) not in built:
            built[id(app)] = build_command(app)
        return built[id(app)]

    monkeypatch.setattr(typer.main, "get_command", get_command)


SETTINGS = settings(
    max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def _write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def _mutated(entries, metadata, data):
    """The file bytes for one drawn mutation, and whether it certainly breaks the file."""
    target = data.draw(st.sampled_from(["tensor", "tensor", "metadata"]))
    if target == "metadata":
        metadata, broken = data.draw(metadata_field())
        return build(entries, metadata), broken
    fields, entries, broken = data.draw(tensor_field(entries))
    rename = fields.pop("__rename__", None)
    if rename is None:
        return build(entries, metadata, fields), broken
    old, new = rename  # a name the JSON dict cannot hold twice: splice the header text
    content = build(entries, metadata)
    (length,) = struct.unpack("<Q", content[:8])
    header = content[8 : 8 + length].replace(json.dumps(old).encode(), json.dumps(new).encode(), 1)
    return struct.pack("<Q", len(header)) + header + content[8 + length :], broken


@pytest.mark.slow
@SETTINGS
@given(data=st.data())
def test_every_command_on_a_source_with_one_field_replaced(capsys, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("src")
    content, broken = _mutated(source_entries(), {"note": "source"}, data)
    path = _write(folder, "model.safetensors", content)
    quantized = _write(folder, "q.safetensors", build(*quantized_entries()))
    out = folder / "out.safetensors"
    for args, output in source_commands(path, out, quantized):
        result = _check(capsys, args, output, folder, {path.name, quantized.name}, broken)
        if broken:
            assert result.code != 0, (args[0], "accepted a broken header")


@pytest.mark.slow
@SETTINGS
@given(data=st.data())
def test_every_command_on_a_quantized_file_with_one_field_replaced(capsys, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("q")
    source = _write(folder, "source.safetensors", build(source_entries(), {"note": "source"}))
    entries, metadata = quantized_entries()
    repairable = False
    target = data.draw(st.sampled_from(["header", "layer json", "header json"]))
    if target == "header":
        content, broken = _mutated(entries, metadata, data)
    elif target == "layer json":
        raw = data.draw(BAD_LAYER_JSON | GOOD_LAYER_JSON)
        broken, repairable = raw not in GOOD_LAYER_JSON_VALUES, True
        entries[f"{LAYER}.comfy_quant"] = Entry("U8", [len(raw)], raw)
        content = build(entries, metadata)
    else:
        raw = data.draw(
            st.text(max_size=20)
            | json_values.map(lambda v: render(v).decode())
            | st.dictionaries(st.just("layers"), json_values).map(lambda v: render(v).decode())
            | BAD_LAYER_JSON.filter(lambda b: b.startswith(b"{") and _utf8(b)).map(
                lambda b: '{"layers": {"%s": %s}}' % (LAYER, b.decode())
            )
        )
        broken, repairable = not _header_carrier_ok(raw), True
        content = build(entries, {**metadata, HEADER_KEY: raw})
    path = _write(folder, "q.safetensors", content)
    out = folder / "out.safetensors"
    for args, output, repairs in quantized_commands(path, source, out):
        result = _check(capsys, args, output, folder, {path.name, source.name}, broken)
        if broken and not (repairs and repairable):
            assert result.code != 0, (args[:2], "accepted a broken file")


GOOD_LAYER_JSON_VALUES = {b'{"format":"float8_e4m3fn"}', b'{"format": "float8_e4m3fn", "note": "x"}'}


def _header_carrier_ok(raw: str) -> bool:
    """False when the _quantization_metadata text is certainly unusable."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    if not isinstance(body, dict) or not isinstance(body.get("layers", {}), dict):
        return False
    return all(isinstance(c, dict) and _valid_config(c) for c in body.get("layers", {}).values())


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_the_unmutated_files_pass_every_command(capsys, tmp_path):
    source = _write(tmp_path, "source.safetensors", build(source_entries(), {"note": "source"}))
    entries, metadata = quantized_entries()
    path = _write(tmp_path, "q.safetensors", build(entries, metadata))
    for args, output in source_commands(source, tmp_path / "out.safetensors", path):
        assert _check(capsys, args, output, tmp_path, {source.name, path.name}).code == 0, args
    for args, output, _ in quantized_commands(path, source, tmp_path / "out.safetensors"):
        if args[1] == "unset":
            continue  # no layer has the key: a usage error on a valid file
        assert _check(capsys, args, output, tmp_path, {source.name, path.name}).code == 0, args
