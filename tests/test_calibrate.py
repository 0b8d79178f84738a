"""Calibration: capture per-layer input statistics from a torch model, save them, and
hand them to the optimizer through ``cq convert --calibration``."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cq_core.commands.calibrate import parse_token_range
from cq_core.engine.capture import SAMPLE_ROWS, StatisticsCapture, capture_statistics, random_token_batches, run_batches
from cq_core.io.calibration_file import CalibrationFile, load_statistics, save_statistics
from cq_core.commands.convert import convert
from cq_core.errors import CqError, UsageError
from tests.cli_runner import run_cq
from tests.conftest import small_model, write_checkpoint


class TinyBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # (batch, tokens, features): statistics pool every token of every batch.
    return [torch.randn(3, 5, 8, generator=g) * torch.arange(1, 9), torch.randn(2, 7, 8, generator=g)]


def test_capture_writes_expected_keys_shapes_and_values(tmp_path):
    model = TinyBlock()
    data = batches()
    stats = capture_statistics(model, data)
    assert sorted(stats) == ["fc1", "fc2"]
    assert stats["fc1"]["H"].shape == (8, 8) and stats["fc1"]["absmax"].shape == (8,)
    assert stats["fc2"]["H"].shape == (16, 16) and stats["fc2"]["absmax"].shape == (16,)

    x1 = torch.cat([b.reshape(-1, 8) for b in data]).double()
    torch.testing.assert_close(stats["fc1"]["H"], (x1.T @ x1 / x1.shape[0]).float())
    torch.testing.assert_close(stats["fc1"]["absmax"], x1.abs().amax(0).float())
    torch.testing.assert_close(stats["fc1"]["absmean"], x1.abs().mean(0).float())
    # 29 rows seen, fewer than SAMPLE_ROWS: the sample holds every one of them, in some order.
    sample = stats["fc1"]["sample"].double()
    assert sample.shape == (29, 8)
    assert torch.equal(sample[torch.argsort(sample[:, 0])], x1[torch.argsort(x1[:, 0])])
    with torch.no_grad():
        x2 = torch.cat([model.act(model.fc1(b)).reshape(-1, 16) for b in data]).double()
    torch.testing.assert_close(stats["fc2"]["H"], (x2.T @ x2 / x2.shape[0]).float(), rtol=1e-5, atol=1e-6)

    path = save_statistics(stats, tmp_path / "calib.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == [f"{layer}.{stat}" for layer in ("fc1", "fc2")
                                    for stat in ("H", "absmax", "absmean", "sample")]
        assert f.get_slice("fc2.H").get_shape() == [16, 16]
    loaded = load_statistics(path)
    assert torch.equal(loaded["fc2"]["H"], stats["fc2"]["H"])


def test_capture_options_and_errors():
    model = TinyBlock()
    stats = capture_statistics(model, batches(), layers="fc2", prefix="model.")
    assert list(stats) == ["model.fc2"]
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed afterwards
    mapping_stats = capture_statistics(model, [{"x": torch.ones(2, 8)}])  # a dict batch is passed as kwargs
    assert torch.equal(mapping_stats["fc1"]["H"], torch.ones(8, 8))
    with pytest.raises(UsageError, match="no nn.Linear"):
        capture_statistics(torch.nn.Sequential(torch.nn.ReLU()), batches())
    with pytest.raises(UsageError, match="No calibration batch"):
        capture_statistics(model, [])


def test_cli_calibrate_from_a_python_file(tmp_path, capsys):
    source = tmp_path / "calib_model.py"
    source.write_text(textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        def data():
            return [torch.randn(4, 8) for _ in range(3)]
    """))
    out = tmp_path / "stats.safetensors"
    result = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--data", f"{source}:data", "-o", out)
    assert result.code == 0, result.err
    assert "2 Linear layers" in result.out
    assert sorted(CalibrationFile(out).layers) == ["0", "2"]
    again = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--data", f"{source}:data", "-o", out)
    assert again.code != 0 and "already exists" in again.err
    missing = run_cq(capsys, "calibrate", "--model", f"{source}:nope", "--data", f"{source}:data", "-o", out,
                     "--overwrite")
    assert missing.code != 0 and "'nope'" in missing.err
    # --rank bounds each layer with more inputs than R: a sketch plus the exact diagonal.
    bounded = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--data", f"{source}:data", "-o", out,
                     "--overwrite", "--rank", "4")
    assert bounded.code == 0, bounded.err
    calib = CalibrationFile(out)
    assert calib.get("0")["H_lowrank"].shape == (4, 8) and calib.get("2")["H_diag"].shape == (16,)
    assert calib.rows == {"0": 12, "2": 12}
    negative = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--data", f"{source}:data", "-o", out,
                      "--overwrite", "--rank", "-1")
    assert negative.code == 2 and "--rank" in negative.err
    no_model = run_cq(capsys, "calibrate", "-o", tmp_path / "x.safetensors")
    assert no_model.code == 2 and "--model" in no_model.err
    quiet = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--data", f"{source}:data", "-o", out,
                   "--overwrite", "-q")
    assert quiet.code == 0 and quiet.out.strip() == f"wrote statistics of 2 Linear layers to {out}" and not quiet.err


def test_calibration_reports_progress_after_each_batch():
    seen: list[tuple[int, int | None]] = []
    run_batches(StatisticsCapture(), TinyBlock(), batches(), progress=lambda n, total: seen.append((n, total)))
    assert seen == [(1, 2), (2, 2)]  # a list: its length is the total
    seen.clear()
    run_batches(StatisticsCapture(), TinyBlock(), iter(batches()), progress=lambda n, total: seen.append((n, total)))
    assert seen == [(1, None), (2, None)]  # an iterator: no total


def test_calibration_data_that_fails_or_a_bad_layer_regex_is_one_sentence(capsys, tmp_path):
    def broken():
        yield torch.randn(2, 8)
        raise RuntimeError("data broke")

    with pytest.raises(CqError, match=r"^The calibration data failed to give batch 2: RuntimeError: data broke$"):
        run_batches(StatisticsCapture(), TinyBlock(), broken())
    with pytest.raises(UsageError, match=r"--layers '\(' is not a valid regular expression"):
        StatisticsCapture(layers="(")
    source = tmp_path / "calib_model.py"
    source.write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Sequential(torch.nn.Linear(8, 4))
        def data():
            yield torch.randn(2, 8)
            raise ValueError("the dataset is gone")
    """))
    out = tmp_path / "s.safetensors"
    result = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--data", f"{source}:data", "-o", out)
    assert result.code == 1 and result.err.strip() == (
        "cq: error: The calibration data failed to give batch 2: ValueError: the dataset is gone"), result.err
    bad = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--data", f"{source}:data", "-o", out,
                 "--layers", "(")
    assert bad.code == 2 and "--layers '(' is not a valid regular expression" in bad.err, bad.err
    source.write_text(source.read_text() + textwrap.dedent("""
        def badmodel():
            raise RuntimeError("no gpu")
        def nodata():
            raise OSError("no such dataset")
        notdata = 3
    """))
    (tmp_path / "broken_model.py").write_text("def build(:\n")
    for model_spec, data_spec, code, message in (
        (f"{source}:badmodel", f"{source}:data", 1, "building the model failed: RuntimeError: no gpu"),
        (f"{source}:build", f"{source}:nodata", 1, "making the batches failed: OSError: no such dataset"),
        (f"{tmp_path / 'broken_model.py'}:build", f"{source}:data", 1, "failed: SyntaxError"),
        (f"{source}:build", f"{source}:notdata", 2, "did not give an iterable of batches (it gave int)"),
    ):
        failed = run_cq(capsys, "calibrate", "--model", model_spec, "--data", data_spec, "-o", out)
        assert failed.code == code and message in failed.err and len(failed.err.strip().splitlines()) == 1, failed.err
    folder = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--data", f"{source}:data", "-o", tmp_path)
    assert folder.code == 1 and "is a directory" in folder.err, folder.err
    assert not out.exists()


def test_random_token_batches_are_unpadded_wrapped_and_reproducible():
    batches = random_token_batches(999, 30522, sequences=20, batch_size=8, first=101, last=102, seed=3)
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8, 4]
    for batch in batches:
        ids = batch["input_ids"]
        assert 8 + 2 <= ids.shape[1] <= 40 + 2
        assert bool((ids[:, 0] == 101).all()) and bool((ids[:, -1] == 102).all())
        body = ids[:, 1:-1]
        assert int(body.min()) >= 999 and int(body.max()) < 30522
        assert torch.equal(batch["attention_mask"], torch.ones_like(ids))  # no padding in the statistics
    again = random_token_batches(999, 30522, sequences=20, batch_size=8, first=101, last=102, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    other = random_token_batches(999, 30522, sequences=20, batch_size=8, first=101, last=102, seed=4)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))
    plain = random_token_batches(0, 5, sequences=3, min_length=4, max_length=4)
    assert plain[0]["input_ids"].shape == (3, 4) and int(plain[0]["input_ids"].max()) < 5
    # drawn on the CPU, handed over where the model is
    moved = random_token_batches(0, 5, sequences=3, min_length=4, max_length=4, device="meta")
    assert moved[0]["input_ids"].device.type == "meta" and moved[0]["attention_mask"].device.type == "meta"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"low": 5, "high": 5}, "0 <= LOW < HIGH"),
        ({"low": 0, "high": 9, "min_length": 9, "max_length": 3}, "1 <= MIN <= MAX"),
        ({"low": 0, "high": 9, "sequences": 0}, "at least one sequence"),
    ],
)
def test_random_token_batches_refuse_impossible_settings(kwargs, message):
    with pytest.raises(UsageError, match=message):
        random_token_batches(**kwargs)


def test_parse_token_range():
    assert parse_token_range("30522") == (0, 30522)
    assert parse_token_range("999:30522") == (999, 30522)
    with pytest.raises(UsageError, match="VOCAB_SIZE or LOW:HIGH"):
        parse_token_range("lots")


TOKEN_MODEL = """
import torch
class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 8)
        self.proj = torch.nn.Linear(8, 6)
    def forward(self, input_ids, attention_mask):
        return self.proj(self.embed(input_ids)) * attention_mask[..., None]
def build():
    return Encoder()
"""


def test_cli_calibrate_data_free_from_random_tokens(tmp_path, capsys):
    source = tmp_path / "token_model.py"
    source.write_text(TOKEN_MODEL)
    out = tmp_path / "stats.safetensors"
    result = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--random-tokens", "10:50",
                    "--first-token", "1", "--last-token", "2", "--sequences", "16", "-o", out)
    assert result.code == 0, result.err
    stats = load_statistics(out)
    assert sorted(stats) == ["proj"]
    # The Linear saw exactly the embedding rows of the tokens drawn: H is their second moment.
    import importlib.util

    spec = importlib.util.spec_from_file_location("token_model", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.build().embed.weight.detach().double()
    ids = torch.cat([b["input_ids"].reshape(-1) for b in random_token_batches(10, 50, sequences=16, first=1, last=2)])
    rows = table[ids]
    torch.testing.assert_close(stats["proj"]["H"], (rows.T @ rows / rows.shape[0]).float())

    both = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--random-tokens", "50", "--data",
                  f"{source}:build", "-o", tmp_path / "x.safetensors")
    assert both.code != 0 and "either --data" in both.err and not (tmp_path / "x.safetensors").exists()
    neither = run_cq(capsys, "calibrate", "--model", f"{source}:build", "-o", tmp_path / "y.safetensors")
    assert neither.code != 0 and "either --data" in neither.err


def test_cli_calibrate_says_which_batch_the_model_failed_on(tmp_path, capsys):
    source = tmp_path / "plain_model.py"
    source.write_text("import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(8, 4))\n")
    out = tmp_path / "stats.safetensors"
    result = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--random-tokens", "100", "-o", out)
    assert result.code != 0 and not out.exists()
    assert "Calibration batch 1 failed in the model: TypeError" in result.err
    assert "--random-tokens calls model(input_ids=..., attention_mask=...)" in result.err
    assert "Traceback" not in result.err


def calibration_for(model: dict[str, torch.Tensor], tmp_path, seed: int = 0):
    """Anisotropic input statistics for every 2-D Linear weight of the test checkpoint."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, weight in model.items():
        if key.endswith(".weight") and weight.dim() == 2 and "embed" not in key:
            k = weight.shape[1]
            x = torch.randn(256, k, generator=g) @ (torch.randn(k, k, generator=g) * torch.logspace(0, -2, k))
            tensors[f"{key.removesuffix('.weight')}.H"] = x.T @ x / 256
            tensors[f"{key.removesuffix('.weight')}.absmax"] = x.abs().amax(0)
    path = tmp_path / "calib.safetensors"
    save_file(tensors, str(path))
    return path


def test_convert_passes_each_layers_statistics_to_the_optimizer(tmp_path, capsys):
    model = small_model(torch.float32)
    source = write_checkpoint(tmp_path / "model.safetensors", model)
    calib = calibration_for(model, tmp_path)
    report = convert(source, tmp_path / "out.safetensors", optimizer="gptq", calibration=calib, model="none",
                     device="cpu")
    notes = {t.name: t.note for t in report.quantized}
    assert notes and all(note.startswith("gptq won: output error +") for note in notes.values()), notes

    cli = run_cq(capsys, "convert", source, "-o", tmp_path / "cli.safetensors", "--optimizer", "learned",
                 "--calibration", calib, "--model", "none", "--device", "cpu")
    assert cli.code == 0, cli.err
    assert "learned won: output error" in cli.out


def test_an_optimizer_that_needs_calibration_refuses_to_run_without(tmp_path, capsys):
    source = write_checkpoint(tmp_path / "model.safetensors", small_model(torch.float32))
    result = run_cq(capsys, "convert", source, "--optimizer", "gptq", "--model", "none")
    assert result.code == 2
    assert "--optimizer gptq needs --calibration FILE" in result.err and "--random-tokens" in result.err
    assert not list(tmp_path.glob("model-*.safetensors"))
    # ...also when only a layer rule asks for it
    config = tmp_path / "layers.toml"
    config.write_text('[layers]\n"fc" = { optimizer = "gptq" }\n')
    ruled = run_cq(capsys, "convert", source, "--layer-config", config, "--model", "none")
    assert ruled.code == 2 and "--optimizer gptq needs --calibration" in ruled.err
    # learned works either way: without statistics it is weight-only
    learned = run_cq(capsys, "convert", source, "--optimizer", "learned", "--model", "none", "-q")
    assert learned.code == 0, learned.err


def test_convert_rejects_calibration_for_another_model(tmp_path, capsys):
    source = write_checkpoint(tmp_path / "model.safetensors", small_model(torch.float32))
    other = tmp_path / "other.safetensors"
    save_file({"text_model.fc.H": torch.eye(4), "text_model.fc.absmax": torch.ones(4)}, str(other))
    result = run_cq(capsys, "convert", source, "--optimizer", "gptq", "--calibration", other, "--model", "none")
    assert result.code != 0
    assert "none of its layers" in result.err and "text_model.fc" in result.err
    assert not (tmp_path / "model-float8_e4m3fn.safetensors").exists()
    missing = run_cq(capsys, "convert", source, "--calibration", tmp_path / "nope.safetensors")
    assert missing.code != 0 and "nope.safetensors" in missing.err


def test_the_sample_is_bounded_uniform_and_reproducible():
    layer = torch.nn.Linear(4, 2)
    rows = torch.arange(1000, dtype=torch.float32).reshape(-1, 1).expand(-1, 4)
    data = [rows[i : i + 100] for i in range(0, 1000, 100)]
    first = capture_statistics(layer, data)[""]["sample"]
    again = capture_statistics(layer, data)[""]["sample"]
    assert first.shape == (SAMPLE_ROWS, 4) and torch.equal(first, again)
    drawn = first[:, 0]
    assert len(set(drawn.tolist())) == SAMPLE_ROWS  # without replacement
    assert 300 < float(drawn.mean()) < 700  # from every batch, not only the first ones
