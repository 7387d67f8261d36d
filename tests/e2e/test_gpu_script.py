"""benchmark/gpu.sh, the GPU check, run end to end on the CPU with the tiny random shape: it must work the
first time a GPU is lent, so every step of it runs here (random model, floor, shard benchmark with and
without CUDA graphs, transformers' baseline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def test_gpu_script_runs_every_step_on_a_tiny_model(tmp_path: Path) -> None:
    env = dict(
        os.environ, PYTHON=sys.executable, SHAPE="tiny", DEVICE="cpu", BATCHES="1,2", OUT=str(tmp_path / "out"),
        MODEL=str(tmp_path / "model"), SOCK=str(tmp_path / "shard"),
    )  # fmt: skip
    done = subprocess.run(
        ["bash", str(REPO / "benchmark" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert json.loads((out / "gpu-floor.json").read_text())["decode_floor"]["bytes_per_step"] > 0
    for label in ("graphs", "eager"):
        shard = json.loads((out / f"gpu-shard-{label}.json").read_text())
        assert [r["batch_size"] for r in shard["results"]] == [1, 2]
    baseline = json.loads((out / "gpu-baseline.json").read_text())
    assert baseline["config"]["device"] == "cpu"
