"""``text-generation-benchmark step``: the paged backend's decode step in process, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.step_bench import StepConfig, measure

pytestmark = pytest.mark.timeout(120)


def test_measure_times_every_batch_size(tiny_model_dir: Path) -> None:
    results = measure(
        StepConfig(str(tiny_model_dir), batch_sizes=(1, 3), prompt_length=20, steps=4, warmups=1)
    )
    assert [r.batch_size for r in results] == [1, 3]
    for r in results:
        assert len(r.step_ms) == 4 and 0 < r.best_ms <= r.median_ms
        assert r.tokens_per_s == pytest.approx(r.batch_size / r.median_ms * 1000)


def test_the_step_command_writes_json(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "step.json"
    argv = ["step", "--model-dir", str(tiny_model_dir), "--batch-sizes", "2", "--steps", "2", "--warmups", "0",
            "--prompt-length", "9", "--quantize", "int4", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "step" and data["config"]["quantize"] == "int4"
    assert [r["batch_size"] for r in data["results"]] == [2]
    assert "ms/step" in capsys.readouterr().out
    assert main(["step", "--model-dir", str(tmp_path / "missing")]) == 1
