"""Plots of `serve` results: PNG files from one run (`serve --plot-dir`) and from several results files
(`plot`), drawn on the same axes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.config import ServeConfig
from benchmark.metrics import compute_level_metrics
from benchmark.plots import LATENCY_FILE, THROUGHPUT_FILES, default_labels, load_result, series_of
from benchmark.records import RequestRecord
from benchmark.runner import LevelResult
from benchmark.serve import LevelOutcome, ServeResult
from tests.unit.benchmark.test_benchmark import FakeTgi

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    assert len(data) > 10_000, (path, len(data))  # axes, lines, labels: not an empty canvas


def fake_result(*, label: str | None, speed: float, rates: bool = False) -> dict:
    """The JSON of a run whose levels get slower per request as they grow (a plausible server)."""
    levels = []
    for i, load in enumerate((1, 4, 16) if not rates else (0.5, 2.0, 8.0)):
        records = []
        for index in range(4):
            record = RequestRecord(index=index, concurrency=None if rates else int(load))
            tpot = (1 + i) / speed
            for t in range(8):
                record.add_tokens(1, 0.05 * (1 + i) + t * tpot)
            record.ok, record.e2e_s = True, record.token_times_s[-1]
            records.append(record)
        concurrency, rate = (None, load) if rates else (int(load), None)
        wall = 8 * 4 * 0.1 / (1 + i) * 100 / speed
        metrics = compute_level_metrics(concurrency, records, wall, request_rate=rate)
        levels.append(LevelOutcome(LevelResult(concurrency, 4, wall, False, records, rate), metrics))
    config = ServeConfig(request_rates=(0.5, 2.0, 8.0)) if rates else ServeConfig(concurrency=(1, 4, 16))
    config = ServeConfig(**{**config.__dict__, "label": label})
    return ServeResult(config, "prompt", "2025-01-01T00:00:00+00:00", levels).to_json()


def write(path: Path, result: dict) -> Path:
    path.write_text(json.dumps(result))
    return path


@pytest.mark.timeout(60)
def test_series_and_labels(tmp_path):
    result = fake_result(label="ours", speed=100)
    series = series_of(result, "ours")
    assert series.mode == "concurrency" and series.x == [1, 4, 16]
    assert series.tpot_p50_ms == pytest.approx([10.0, 20.0, 30.0])
    rate_series = series_of(fake_result(label=None, speed=50, rates=True), "peer")
    assert rate_series.mode == "request_rate" and rate_series.x == [0.5, 2.0, 8.0]
    unlabeled = {**result, "label": None}
    assert default_labels([result, unlabeled], ["a.json", "dir/b.json"]) == ["ours", "b"]
    assert load_result(write(tmp_path / "r.json", result))["label"] == "ours"


@pytest.mark.timeout(60)
def test_plot_two_results_files(tmp_path, capsys):
    ours = write(tmp_path / "ours.json", fake_result(label="ours", speed=100))
    peer = write(tmp_path / "peer.json", fake_result(label=None, speed=60))
    out_dir = tmp_path / "plots"
    code = main(["plot", str(ours), str(peer), "--labels", "ours,llama.cpp", "--output-dir", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    expected = [out_dir / THROUGHPUT_FILES["concurrency"], out_dir / LATENCY_FILE]
    assert out.split() == [str(p) for p in expected]
    for path in expected:
        assert_png(path)
    assert not (out_dir / THROUGHPUT_FILES["request_rate"]).exists()


@pytest.mark.timeout(60)
def test_plot_one_file_and_mixed_sweeps(tmp_path, capsys):
    one = write(tmp_path / "one.json", fake_result(label="ours", speed=100))
    assert main(["plot", str(one), "--output-dir", str(tmp_path / "single")]) == 0
    assert_png(tmp_path / "single" / THROUGHPUT_FILES["concurrency"])
    assert_png(tmp_path / "single" / LATENCY_FILE)
    # A rate sweep and a concurrency sweep: one throughput plot per kind, one shared latency plot.
    rates = write(tmp_path / "rates.json", fake_result(label="open loop", speed=80, rates=True))
    assert main(["plot", str(one), str(rates), "--output-dir", str(tmp_path / "mixed")]) == 0
    for name in (*THROUGHPUT_FILES.values(), LATENCY_FILE):
        assert_png(tmp_path / "mixed" / name)
    capsys.readouterr()
    # Usage errors: labels that do not match the files, a file that is not a results file.
    assert main(["plot", str(one), "--labels", "a,b", "--output-dir", str(tmp_path / "x")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    assert main(["plot", str(bad), "--output-dir", str(tmp_path / "x")]) == 2
    assert main(["plot", str(tmp_path / "missing.json")]) == 2
    _, err = capsys.readouterr()
    assert "2 label(s) for 1 results file(s)" in err
    assert "not a results file" in err


@pytest.fixture
def fake_tgi():
    server = FakeTgi().start()
    yield server
    server.stop()


@pytest.mark.timeout(60)
def test_serve_plot_dir(fake_tgi, tmp_path, capsys):
    plot_dir = tmp_path / "serve-plots"
    output = tmp_path / "run.json"
    args = ["serve", "--url", fake_tgi.url, "--concurrency", "1,2", "--requests-per-level", "4"]
    args += ["--max-new-tokens", "5", "--warmup", "0", "--label", "ours", "--output", str(output)]
    assert main([*args, "--plot-dir", str(plot_dir)]) == 0
    _, err = capsys.readouterr()
    assert "plots written" in err
    assert_png(plot_dir / THROUGHPUT_FILES["concurrency"])
    assert_png(plot_dir / LATENCY_FILE)
    assert json.loads(output.read_text())["label"] == "ours"
    # The results file it wrote plots again, next to another run.
    assert main(["plot", str(output), str(output), "--output-dir", str(tmp_path / "again")]) == 0
    assert_png(tmp_path / "again" / LATENCY_FILE)
