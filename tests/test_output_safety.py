"""Writing never follows a planted link, never mixes two runs, never overwrites an input;
and every command reads a sharded checkpoint (index or folder) as one."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import cq_core
import cq_core.io.outputs as outputs
from cq_core.errors import CqError, UsageError
from cq_core.commands.meta import set_keys
from cq_core.commands.migrate import migrate
from cq_core.io.outputs import LOCK_SUFFIX, partial_files
from cq_core.io.safetensors_io import StreamingWriter
from cq_core.commands.verify import verify
from tests.cli_runner import run_cq
from tests.conftest import small_model, write_checkpoint
from tests.test_migrate import legacy_fp8_file
from tests.test_shards import model, write_sharded

PRECIOUS = b"outside the output folder: must never change\n"


def load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file in another folder that planted links point at."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    target = folder / "precious.bin"
    target.write_bytes(PRECIOUS)
    return target


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


# -- planted links --------------------------------------------------------------------------


def plant_links(monkeypatch, folder: Path, output_names: list[str], target: Path) -> None:
    """Links under every name a writer could pick: the old fixed partial names, the first random
    names it will draw (made predictable here), and the lock file."""
    drawn = iter(f"{n:012x}" for n in range(10**6))
    monkeypatch.setattr(outputs.secrets, "token_hex", lambda n: next(drawn))
    for name in output_names:
        (folder / f".{name}.cq-partial").symlink_to(target)
        for n in range(len(output_names) + 1):
            (folder / f".{name}.{n:012x}.cq-partial").symlink_to(target)


def run_convert(work: Path, source: Path, **options):
    return cq_core.convert(source, work / "out.safetensors", model="none", **options)


@pytest.mark.parametrize(
    "command",
    ["convert", "convert sharded", "migrate copy", "migrate", "meta set", "calibration stats"],
)
def test_a_planted_link_never_redirects_a_write(work, outside, monkeypatch, command):
    source = write_checkpoint(work.parent / "model.safetensors", small_model())
    legacy = work.parent / "legacy.safetensors"
    legacy_fp8_file(legacy)
    quantized = work.parent / "q.safetensors"
    cq_core.convert(source, quantized)
    if command == "convert sharded":
        plant_links(monkeypatch, work, ["out.safetensors.index.json"]
                    + [f"out-{i:05d}-of-{n:05d}.safetensors" for n in range(1, 6) for i in range(1, n + 1)], outside)
    else:
        plant_links(monkeypatch, work, ["out.safetensors"], outside)
    links = names(work)
    if command == "convert":
        cq_core.convert(source, work / "out.safetensors")
    elif command == "convert sharded":
        cq_core.convert(source, work / "out.safetensors", max_shard_size="8KB")
    elif command == "migrate copy":
        migrate(quantized, work / "out.safetensors")
    elif command == "migrate":
        migrate(legacy, work / "out.safetensors")
    elif command == "meta set":
        set_keys(quantized, work / "out.safetensors", {"full_precision_matrix_mult": True})
    else:
        from cq_core.io.calibration_file import save_statistics

        save_statistics({"blocks.0.fc": {"H": torch.eye(4), "absmax": torch.ones(4)}}, work / "out.safetensors")
    assert outside.read_bytes() == PRECIOUS
    written = sorted(set(names(work)) - set(links))
    assert written and all(not (work / n).is_symlink() for n in written)
    assert all((work / n).is_symlink() for n in links)  # the planted links were neither used nor removed
    if command == "convert sharded":
        assert len(written) >= 3 and "out.safetensors.index.json" in written
    else:
        assert written == ["out.safetensors"]
        load(work / "out.safetensors")


def test_a_link_planted_as_the_lock_file_is_refused(work, outside, model_file):
    (work / f".out.safetensors{LOCK_SUFFIX}").symlink_to(outside)
    with pytest.raises(CqError, match="is a symbolic link"):
        cq_core.convert(model_file, work / "out.safetensors")
    assert outside.read_bytes() == PRECIOUS
    assert names(work) == [f".out.safetensors{LOCK_SUFFIX}"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_a_link_is_refused(capsys, work, outside, model_file, overwrite):
    (work / "out.safetensors").symlink_to(outside)
    r = run_cq(capsys, "convert", model_file, "-o", work / "out.safetensors", *(["--overwrite"] if overwrite else []))
    assert r.code == 1 and r.err.count("\n") == 1 and "is a symbolic link" in r.err, r.err
    assert outside.read_bytes() == PRECIOUS and names(work) == ["out.safetensors"]


def test_a_dangling_link_as_output_is_not_written_through(capsys, work, model_file):
    (work / "out.safetensors").symlink_to(work.parent / "created-through-the-link.safetensors")
    r = run_cq(capsys, "convert", model_file, "-o", work / "out.safetensors")
    assert r.code == 1 and "symbolic link" in r.err
    assert not (work.parent / "created-through-the-link.safetensors").exists()


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda w: (w / "out.safetensors").mkdir(), "is a directory"),
        (lambda w: None, "the output directory does not exist"),
        (lambda w: (w / "file").write_bytes(b"x"), "is not a directory"),
    ],
)
def test_a_hostile_output_path_is_one_sentence(capsys, work, model_file, make, message):
    make(work)
    target = {
        "is a directory": work / "out.safetensors",
        "the output directory does not exist": work / "missing" / "out.safetensors",
        "is not a directory": work / "file" / "out.safetensors",
    }[message]
    before = names(work)
    r = run_cq(capsys, "convert", model_file, "-o", target)
    assert r.code == 1 and message in r.err and r.err.count("\n") == 1, r.err
    assert names(work) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_one_sentence(capsys, work, model_file):
    work.chmod(0o500)
    try:
        r = run_cq(capsys, "convert", model_file, "-o", work / "out.safetensors")
    finally:
        work.chmod(0o700)
    assert r.code == 1 and "cannot be written" in r.err and names(work) == []


def test_a_folder_that_refuses_new_files_is_one_sentence(capsys, work, model_file, monkeypatch):
    """What an unwritable folder does when cq runs as root cannot be shown with chmod: refuse the open."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if kwargs.get("dir_fd") is not None and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(outputs.os, "open", refusing_open)
    r = run_cq(capsys, "convert", model_file, "-o", work / "out.safetensors")
    assert r.code == 1 and r.err.count("\n") == 1 and "cannot be written (Permission denied)" in r.err, r.err
    assert names(work) == []


# -- two writers ------------------------------------------------------------------------------


class Paused:
    """Runs a conversion on a thread and holds it inside its first tensor write until released
    (the run's writes may come from its pipeline's own thread: the first write of any thread)."""

    def __init__(self, monkeypatch, run) -> None:
        self.inside, self.release = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        real_write = StreamingWriter.write
        owner = self

        lock = threading.Lock()

        def write(self, name, tensor):
            with lock:
                first = not owner.inside.is_set()
                owner.inside.set()
            if first:
                assert owner.release.wait(60)
            return real_write(self, name, tensor)

        monkeypatch.setattr(StreamingWriter, "write", write)

        def target():
            try:
                run()
            except BaseException as exc:  # noqa: BLE001 (reported to the test)
                self.error = exc

        self.thread = threading.Thread(target=target)
        self.thread.start()
        assert self.inside.wait(30), self.error

    def finish(self) -> None:
        self.release.set()
        self.thread.join(60)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_second_run_to_the_same_output_is_refused_and_the_first_completes(
    capsys, work, model_file, monkeypatch, overwrite
):
    out = work / "out.safetensors"
    if overwrite:
        cq_core.convert(model_file, out, format="float8_e5m2")
    first = Paused(monkeypatch, lambda: cq_core.convert(model_file, out, overwrite=overwrite))
    try:
        r = run_cq(capsys, "convert", model_file, "-o", out, "-f", "int8_tensorwise",
                   *(["--overwrite"] if overwrite else []))
    finally:
        first.finish()
    assert first.error is None
    assert r.code == 1 and "another cq run is writing it" in r.err and r.err.count("\n") == 1, r.err
    assert names(work) == ["out.safetensors"]
    result = verify(model_file, out)  # the first run's file, whole: its carriers agree on every layer
    assert result.ok and {c.format for c in result.layers} == {"float8_e4m3fn"}


def test_a_second_sharded_run_is_refused(work, model_file, monkeypatch):
    out = work / "out.safetensors.index.json"
    first = Paused(monkeypatch, lambda: cq_core.convert(model_file, out, max_shard_size="8KB"))
    try:
        with pytest.raises(CqError, match="another cq run is writing it"):
            cq_core.convert(model_file, out, max_shard_size="4KB")
    finally:
        first.finish()
    assert first.error is None and verify(model_file, out).ok
    assert not [n for n in names(work) if n.startswith(".")]


@pytest.mark.parametrize("existed", [False, True])
def test_another_program_writing_the_output_meanwhile_wins(work, model_file, monkeypatch, existed):
    """A writer that takes no lock is noticed at the rename: its file stays, this run's goes."""
    out = work / "out.safetensors"
    if existed:
        out.write_bytes(b"old")
    first = Paused(monkeypatch, lambda: cq_core.convert(model_file, out, overwrite=existed))
    other = work / "other.tmp"
    other.write_bytes(b"the other program's file")
    os.replace(other, out)
    first.finish()
    assert isinstance(first.error, CqError) and "another program wrote it" in str(first.error)
    assert out.read_bytes() == b"the other program's file"
    assert names(work) == ["out.safetensors"]


def test_a_stale_lock_file_from_a_killed_run_does_not_block(work, model_file):
    (work / f".out.safetensors{LOCK_SUFFIX}").write_bytes(b"")
    cq_core.convert(model_file, work / "out.safetensors")
    assert names(work) == ["out.safetensors"]


def test_a_folder_swapped_for_a_link_mid_run_does_not_redirect_the_output(work, outside, model_file, monkeypatch):
    out = work / "out.safetensors"
    first = Paused(monkeypatch, lambda: cq_core.convert(model_file, out))
    moved = work.parent / "moved"
    work.rename(moved)
    work.symlink_to(outside.parent)  # the output path now leads elsewhere
    first.finish()
    assert first.error is None
    assert names(outside.parent) == ["precious.bin"] and outside.read_bytes() == PRECIOUS
    assert names(moved) == ["out.safetensors"]  # written where the run opened its folder
    assert verify(model_file, moved / "out.safetensors").ok


# -- outputs that are inputs -------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_single_file_output_onto_an_input_shard_is_refused(capsys, work):
    index = write_sharded(work, model())
    before = snapshot(work)
    r = run_cq(capsys, "convert", index, "--single-file", "-o", work / "model-00002-of-00003.safetensors",
               "--overwrite", "--model", "none")
    assert r.code == 2 and "would overwrite the input" in r.err and r.err.count("\n") == 1, r.err
    assert snapshot(work) == before


def test_an_index_named_differently_whose_shards_are_the_inputs_is_refused(work):
    write_sharded(work, model())
    index = work / "other-name.safetensors.index.json"
    (work / "model.safetensors.index.json").rename(index)
    before = snapshot(work)
    with pytest.raises(UsageError, match="model-00001-of-00003.safetensors: the output would overwrite"):
        cq_core.convert(index, work / "model.safetensors.index.json", overwrite=True, model="none")
    assert snapshot(work) == before


def test_overwrite_never_deletes_input_shards_as_stale(work):
    write_sharded(work, model())
    index = work / "other-name.safetensors.index.json"
    (work / "model.safetensors.index.json").rename(index)
    before = snapshot(work)
    with pytest.raises(UsageError, match="would delete it as a stale shard"):
        cq_core.convert(index, work / "model.safetensors.index.json", overwrite=True, model="none",
                        max_shard_size="8KB")
    assert snapshot(work) == before


def test_an_output_that_is_the_input_under_another_name_is_refused(work, model_file):
    alias = work / "alias.safetensors"
    os.link(model_file, alias)
    before = model_file.read_bytes()
    with pytest.raises(UsageError, match="would overwrite the input"):
        cq_core.convert(model_file, alias, overwrite=True)
    with pytest.raises(UsageError, match="would overwrite the input"):
        migrate(model_file, alias, overwrite=True)
    assert model_file.read_bytes() == before and alias.exists()


def test_the_calibration_file_is_an_input_too(work, model_file):
    from safetensors.torch import load_file

    from tests.test_calibrate import calibration_for

    stats = calibration_for(load_file(str(model_file)), work)
    before = stats.read_bytes()
    with pytest.raises(UsageError, match="would overwrite the input"):
        cq_core.convert(model_file, stats, overwrite=True, optimizer="gptq", calibration=stats)
    assert stats.read_bytes() == before


def test_migrating_onto_a_shard_of_its_own_index_is_refused(work):
    index = write_sharded(work, model())
    before = snapshot(work)
    with pytest.raises(UsageError, match="would overwrite the input"):
        migrate(index, work / "model-00003-of-00003.safetensors", overwrite=True)
    with pytest.raises(UsageError, match="would overwrite the input"):
        set_keys(index, index, {"full_precision_matrix_mult": True}, overwrite=True)
    assert snapshot(work) == before


# -- sharded input for every command ---------------------------------------------------------------


@pytest.fixture
def quantized_set(tmp_path) -> tuple[Path, Path]:
    """(the source file, the index of its quantized shard set in a folder of its own)."""
    source = write_checkpoint(tmp_path / "model.safetensors", small_model())
    folder = tmp_path / "q"
    folder.mkdir()
    report = cq_core.convert(source, folder / "q.safetensors", max_shard_size="8KB")
    assert len(list(folder.glob("q-*-of-*.safetensors"))) >= 2
    return source, Path(report.output)


@pytest.mark.parametrize("as_folder", [False, True])
def test_every_command_reads_an_index_or_a_folder(capsys, tmp_path, quantized_set, as_folder):
    source, index = quantized_set
    given = index.parent if as_folder else index
    r = run_cq(capsys, "inspect", given, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["quantized_layers"] == 3 and json.loads(r.out)["carriers"]["agree"]
    r = run_cq(capsys, "verify", source, given)
    assert r.code == 0 and "3 layers, 0 failed" in r.out, r.err
    r = run_cq(capsys, "meta", "show", given, "--json")
    assert r.code == 0 and len(json.loads(r.out)["layers"]) == 3 and not json.loads(r.out)["disagreeing"], r.err
    r = run_cq(capsys, "migrate", given, "--check")
    assert r.code == 0 and "already in the current layout" in r.out, r.err
    r = run_cq(capsys, "models", "detect", given)
    assert r.code == 0, r.err

    one = tmp_path / "one.safetensors"
    r = run_cq(capsys, "migrate", given, "-o", one)
    assert r.code == 0, r.err
    assert verify(source, one).ok and len(load(one)) == sum(len(load(p)) for p in index.parent.glob("q-*"))

    edited = tmp_path / "edited.safetensors.index.json"
    r = run_cq(capsys, "meta", "set", given, "full_precision_matrix_mult=true", "-o", edited, "--layer", "fc1")
    assert r.code == 0 and "1 layer changed" in r.out, r.err
    shards = sorted(tmp_path.glob("edited-*-of-*.safetensors"))
    assert len(shards) == len(list(index.parent.glob("q-*-of-*.safetensors")))
    result = verify(source, edited)
    assert result.ok and len(result.layers) == 3
    shown = json.loads(run_cq(capsys, "meta", "show", edited, "--json").out)["layers"]
    assert shown["blocks.0.mlp.fc1"]["header"]["full_precision_matrix_mult"] is True
    assert not any(row["status"] != "agree" for row in shown.values())


def legacy_split(folder: Path) -> Path:
    """A legacy scaled-fp8 checkpoint in two shards, one layer's scale in the other shard than its weight."""
    tensors = legacy_fp8_file(folder / "whole.legacy")
    (folder / "whole.legacy").unlink()
    first = ["scaled_fp8", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.scale_input", "blocks.0.attn.qkv.bias",
             "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.scale_weight"]
    parts = [{n: tensors[n] for n in first}, {n: t for n, t in tensors.items() if n not in first}]
    weight_map = {}
    for number, part in enumerate(parts, 1):
        shard = f"legacy-{number:05d}-of-00002.safetensors"
        write_checkpoint(folder / shard, part)
        weight_map.update({n: shard for n in part})
    index = folder / "legacy.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_a_scale_whose_weight_is_in_another_shard_survives_migration(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    index = legacy_split(folder)
    report = migrate(index, tmp_path / "new.safetensors")
    assert not report.of_kind("drop") or all("orphan" not in n.message for n in report.of_kind("drop"))
    new = load(tmp_path / "new.safetensors")
    assert "blocks.0.mlp.fc2.weight_scale" in new and new["blocks.0.mlp.fc2.weight"].dtype == torch.float8_e5m2
    assert set(report.layers) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    # and as a shard set that mirrors the input's two shards
    migrate(folder, tmp_path / "new.safetensors.index.json")
    assert len(list(tmp_path.glob("new-*-of-00002.safetensors"))) == 2


def test_a_lone_shard_whose_partner_is_elsewhere_is_refused_not_dropped(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    legacy_split(folder)
    for shard in ("legacy-00001-of-00002.safetensors", "legacy-00002-of-00002.safetensors"):
        with pytest.raises(CqError, match="is one shard of a sharded checkpoint.*pass the index or the folder"):
            migrate(folder / shard, tmp_path / "part.safetensors")
    assert not (tmp_path / "part.safetensors").exists()


def test_a_lone_current_shard_with_a_scale_elsewhere_is_refused_and_the_set_migrates(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", small_model())
    out = tmp_path / "q.safetensors"
    cq_core.convert(source, out)
    tensors = load(out)
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    folder = tmp_path / "set"
    folder.mkdir()
    scale = "blocks.0.mlp.fc1.weight_scale"
    write_checkpoint(folder / "c-00001-of-00002.safetensors", {n: t for n, t in tensors.items() if n != scale}, metadata)
    write_checkpoint(folder / "c-00002-of-00002.safetensors", {scale: tensors[scale]})
    for shard in sorted(folder.iterdir()):
        with pytest.raises(CqError, match="one shard of a sharded checkpoint"):
            migrate(shard, tmp_path / "part.safetensors")
    assert not (tmp_path / "part.safetensors").exists()
    migrate(folder, tmp_path / "whole.safetensors")
    assert torch.equal(load(tmp_path / "whole.safetensors")[scale], tensors[scale])
    assert verify(source, tmp_path / "whole.safetensors").ok


def test_two_processes_to_one_output_one_wins_whole(capsys, work):
    """The reported case: two cq processes, one output. The second stops at once; the first's file is whole."""
    import subprocess
    import sys
    import time

    from tests.test_reliability import ROOT, SLOW_CQ

    source = write_checkpoint(work.parent / "m.safetensors", {f"blocks.{i}.fc.weight": torch.randn(64, 64)
                                                              for i in range(6)})
    out = work / "c.safetensors"
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_CQ.format(root=str(ROOT)), "convert", str(source), "-o", str(out),
         "--optimizer", "slow", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not partial_files(out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    r = run_cq(capsys, "convert", source, "-o", out, "-f", "float8_e5m2")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert r.code == 1 and "another cq run is writing it" in r.err, r.err
    assert names(work) == ["c.safetensors"]
    result = verify(source, out)
    assert result.ok and {c.format for c in result.layers} == {"float8_e4m3fn"}


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_a_temporary_swapped_mid_run_is_never_renamed_into_place(tmp_path, monkeypatch, planted):
    """Another program replaces cq's partial file while cq writes it: the output is not created from
    it (the run fails in one sentence), and what was planted, and its target, stay as they were."""
    from cq_core.io import outputs

    source = write_checkpoint(tmp_path / "model.safetensors", small_model())
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    commit = outputs.PendingOutputs.commit

    def swap_then_commit(self):
        for name in self.temporaries.values():
            path = out_dir / name
            path.unlink()
            if planted == "symlink":
                path.symlink_to(victim)
            else:
                path.write_bytes(b"12345")
        return commit(self)

    monkeypatch.setattr(outputs.PendingOutputs, "commit", swap_then_commit)
    with pytest.raises(CqError, match="another program replaced cq's temporary file"):
        cq_core.convert(source, out_dir / "c.safetensors")
    assert not (out_dir / "c.safetensors").exists() and not (out_dir / "c.safetensors").is_symlink()
    assert victim.read_bytes() == b"keep me"
    leftovers = [p for p in out_dir.iterdir() if p.name.endswith(".cq-partial")]
    assert len(leftovers) == 1 and (leftovers[0].is_symlink() if planted == "symlink" else leftovers[0].read_bytes() == b"12345")


# -- --overwrite and a reused inode number ----------------------------------------------------


def test_overwrite_keeps_a_strangers_file_that_got_the_old_files_inode_number(work, model_file, monkeypatch):
    """ext4 hands a deleted file's inode number to the next file created: a stranger's file put under
    the output name mid-run can have the old file's (device, inode). --overwrite replaces only the
    file that was there when the run began, so the stranger's file stays."""
    out = work / "out.safetensors"
    out.write_bytes(b"old")
    old = os.stat(out)
    first = Paused(monkeypatch, lambda: cq_core.convert(model_file, out, overwrite=True))
    out.unlink()
    out.write_bytes(b"the stranger's file")  # on ext4 (this machine) it gets the freed inode number unless held
    first.finish()
    assert isinstance(first.error, CqError) and "another program wrote it" in str(first.error), first.error
    assert out.read_bytes() == b"the stranger's file"
    assert names(work) == ["out.safetensors"]
    assert old.st_ino  # (the number itself is the filesystem's business: the outcome is the test)


def test_overwrite_compares_more_than_device_and_inode(work, model_file, monkeypatch):
    """Where the old file cannot be held open, a file with its (device, inode) but another size,
    mtime or ctime is still a stranger's: simulated by reporting the old numbers for the new file."""
    out = work / "out.safetensors"
    out.write_bytes(b"old")
    old = os.stat(out)
    monkeypatch.setattr(outputs, "hold_open", lambda folder, name: None, raising=False)
    first = Paused(monkeypatch, lambda: cq_core.convert(model_file, out, overwrite=True))
    out.unlink()
    out.write_bytes(b"the stranger's file, longer")
    real_lstat = outputs.OutputFolder.lstat

    def reused_lstat(self, name):
        st = real_lstat(self, name)
        if st is None or name != out.name:
            return st
        fields = list(st)
        fields[stat.ST_INO], fields[stat.ST_DEV] = old.st_ino, old.st_dev
        return os.stat_result((*fields, *(getattr(st, f) for f in ("st_atime", "st_mtime", "st_ctime"))),
                              {"st_atime_ns": st.st_atime_ns, "st_mtime_ns": st.st_mtime_ns,
                               "st_ctime_ns": st.st_ctime_ns})

    monkeypatch.setattr(outputs.OutputFolder, "lstat", reused_lstat)
    first.finish()
    assert isinstance(first.error, CqError) and "another program wrote it" in str(first.error), first.error
    assert out.read_bytes() == b"the stranger's file, longer"


def test_overwrite_deletes_a_stale_shard_only_if_it_is_the_one_that_was_there(work, model_file, monkeypatch):
    out = work / "out.safetensors.index.json"
    cq_core.convert(model_file, out, max_shard_size="4KB")
    before = sorted(work.glob("out-*.safetensors"))
    first = Paused(monkeypatch, lambda: cq_core.convert(model_file, out, max_shard_size="8KB", overwrite=True))
    stale = before[-1]
    stale.unlink()
    stale.write_bytes(b"the stranger's file")
    first.finish()
    assert first.error is None, first.error
    assert stale.read_bytes() == b"the stranger's file"
