"""``text-generation-benchmark floor`` (the floor arithmetic on synthetic figures, parameters counted from
safetensors headers, a short real measurement) and ``baseline`` (transformers' generate on the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark.baseline import BaselineRun
from benchmark.baseline import summarize as summarize_baseline
from benchmark.cli import main
from benchmark.floor import (
    FloorConfig,
    ModelStats,
    build_report,
    compute_ceiling_tokens_per_s,
    decode_floor_steps_per_s,
    format_summary,
    format_versus,
    fraction_of_floor,
    load_floor,
    model_stats,
    run_floor,
    versus_floor,
)

FAST = ["--bandwidth-mib", "8", "--repeats", "2", "--matmul-min-time", "0.005", "--no-progress"]


def synthetic_floor() -> dict:
    """A floor file's content: 39.03 steps/s for 538 MB at 21 GB/s, a ceiling of 1000 tokens/s."""
    bandwidth = {"read_gbps": 21.0, "copy_gbps": 15.0, "bytes": 1}
    matmul = [{"m": 256, "k": 576, "n": 1536, "gflops": 2 * 134_515_008 * 1000 / 1e9}]
    return build_report(FloorConfig(), bandwidth, matmul, synthetic_model()).to_json()


def synthetic_model(params_per_token: int = 134_515_008, bytes_per_token: int = 538_060_032) -> ModelStats:
    return ModelStats(
        model_dir="synthetic", model_type="llama", hidden_size=576, intermediate_size=1536,
        params_total=params_per_token, bytes_total=bytes_per_token, params_per_token=params_per_token,
        bytes_per_token=bytes_per_token, tied_embeddings=True,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Arithmetic


@pytest.mark.timeout(10)
def test_floor_arithmetic() -> None:
    # 538e6 bytes per step at 21 GB/s: 39 steps/s at most for one stream
    assert decode_floor_steps_per_s(538e6, 21.0) == pytest.approx(39.03, abs=0.01)
    # 2 x 135e6 FLOPs per token at 270 GFLOP/s: 1000 tokens/s at most
    assert compute_ceiling_tokens_per_s(135e6, 270.0) == pytest.approx(1000.0)
    assert fraction_of_floor(30.0, 40.0) == pytest.approx(0.75)
    assert fraction_of_floor(1 / 0.050, 1 / 0.025) == pytest.approx(0.5)  # times via their inverses
    for bad in ((0.0, 21.0), (538e6, 0.0)):
        with pytest.raises(ValueError):
            decode_floor_steps_per_s(*bad)
    with pytest.raises(ValueError):
        compute_ceiling_tokens_per_s(0, 100.0)
    with pytest.raises(ValueError):
        fraction_of_floor(1.0, 0.0)


@pytest.mark.timeout(10)
def test_report_from_synthetic_figures() -> None:
    model = synthetic_model()
    bandwidth = {"read_gbps": 21.0, "copy_gbps": 15.0, "bytes": 1}
    matmul = [
        {"m": 1, "k": 576, "n": 1536, "gflops": 20.0},
        {"m": 256, "k": 576, "n": 1536, "gflops": 269.03},
        {"m": 32, "k": 576, "n": 1536, "gflops": 80.0},
    ]
    report = build_report(FloorConfig(weight_bits=16), bandwidth, matmul, model)
    rows = {row.weight_bits: row for row in report.floors}
    assert set(rows) == {None, 32, 16, 8, 4}
    assert rows[None].bytes_per_step == 538_060_032
    assert rows[None].max_steps_per_s == pytest.approx(39.03, abs=0.01)
    assert rows[32].bytes_per_step == 4 * model.params_per_token
    assert rows[16].bytes_per_step == 2 * model.params_per_token
    assert rows[4].bytes_per_step == model.params_per_token / 2
    assert rows[8].max_steps_per_s == pytest.approx(2 * rows[16].max_steps_per_s)
    assert rows[16].min_ms_per_step == pytest.approx(1000 / rows[16].max_steps_per_s)
    assert report.floor is rows[16]
    # the ceiling uses the largest M's rate
    assert report.flops_per_token == 2 * model.params_per_token
    assert report.max_tokens_per_s == pytest.approx(269.03e9 / (2 * model.params_per_token))
    data = report.to_json()
    assert data["decode_floor"]["weight_bits"] == 16 and len(data["decode_floors"]) == 5
    summary = format_summary(report)
    assert "16-bit" in summary and "<-" in summary and "compute ceiling" in summary

    bare = build_report(FloorConfig(), bandwidth, matmul, None)
    assert bare.floors == [] and bare.max_tokens_per_s is None and bare.to_json()["decode_floor"] is None


@pytest.mark.timeout(10)
def test_versus_floor(tmp_path: Path) -> None:
    floor = synthetic_floor()
    row = versus_floor(floor, batch_size=1, steps_per_s=19.5, tokens_per_s=19.5)
    assert row["fraction_of_decode_floor"] == pytest.approx(19.5 / 39.03, rel=1e-3)
    assert row["fraction_of_compute_ceiling"] == pytest.approx(0.0195)
    assert "50.0%" in format_versus(floor, [row]) and "1000 tokens/s" in format_versus(floor, [row])
    path = tmp_path / "floor.json"
    path.write_text(json.dumps(floor))
    assert load_floor(path)["decode_floor"]["max_steps_per_s"] == pytest.approx(39.03, abs=0.01)
    path.write_text(json.dumps({**floor, "decode_floor": None}))  # a floor run without --model-dir
    with pytest.raises(ValueError):
        load_floor(path)


# ---------------------------------------------------------------------------------------------------------
# Parameters and bytes from the checkpoint


@pytest.mark.timeout(30)
def test_model_stats_of_tiny_model(tiny_model_dir: Path) -> None:
    from safetensors import safe_open

    stats = model_stats(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        numels = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118
    total = sum(torch.Size(shape).numel() for shape in numels.values())
    embed = torch.Size(numels["model.embed_tokens.weight"]).numel()
    assert stats.params_total == total and stats.bytes_total == 4 * total  # float32
    assert not stats.tied_embeddings  # the tiny model has its own lm_head
    assert stats.params_per_token == total - embed and stats.bytes_per_token == 4 * (total - embed)
    assert (
        stats.hidden_size == config["hidden_size"] and stats.intermediate_size == config["intermediate_size"]
    )
    assert stats.model_type == "llama" and stats.dtypes == {"F32": total}


@pytest.mark.timeout(30)
def test_model_stats_tied_and_positions(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        "transformer.wte.weight": torch.zeros(100, 8, dtype=torch.bfloat16),  # doubles as the LM head
        "transformer.wpe.weight": torch.zeros(16, 8, dtype=torch.bfloat16),  # gathered only
        "transformer.h.0.mlp.c_fc.weight": torch.zeros(32, 8, dtype=torch.bfloat16),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_inner": 32}))
    stats = model_stats(tmp_path)
    assert stats.tied_embeddings and stats.params_total == 800 + 128 + 256
    assert stats.params_per_token == 800 + 256 and stats.bytes_per_token == 2 * (800 + 256)
    assert (stats.hidden_size, stats.intermediate_size) == (8, 32) and stats.dtypes == {"BF16": 1184}

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "tie_word_embeddings": False}))
    assert model_stats(tmp_path).params_per_token == 256
    with pytest.raises(FileNotFoundError):
        model_stats(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------
# Measuring


@pytest.mark.timeout(60)
def test_run_floor_on_tiny_model(tiny_model_dir: Path) -> None:
    config = FloorConfig(
        model_dir=str(tiny_model_dir), weight_bits=8, m_values=(1, 16), bandwidth_mib=8, repeats=2,
        matmul_min_time_s=0.005,
    )  # fmt: skip
    threads = torch.get_num_threads()
    report = run_floor(config)
    assert torch.get_num_threads() == threads  # restored after measuring at each thread count
    counts = sorted({threads, 1}, reverse=True)
    assert report.bandwidth["read_gbps"] > 0 and report.bandwidth["copy_gbps"] > 0
    assert report.bandwidth["threads"] in counts
    assert [(r["m"], r["k"], r["n"]) for r in report.matmul] == [(1, 64, 128), (16, 64, 128)]
    for row in report.matmul:
        assert set(row["gflops_by_threads"]) == {str(c) for c in counts}
        assert row["gflops"] == max(row["gflops_by_threads"].values()) > 0
        assert row["gflops_by_threads"][str(row["threads"])] == row["gflops"]
    assert report.floor is not None and report.floor.weight_bits == 8
    assert report.floor.bytes_per_step == report.model.params_per_token
    assert report.floor.max_steps_per_s == pytest.approx(
        report.bandwidth["read_gbps"] * 1e9 / report.model.params_per_token
    )
    assert report.max_tokens_per_s > 0 and report.device_name


@pytest.mark.timeout(60)
def test_floor_cli(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "floor.json"
    argv = [
        "floor",
        "--model-dir",
        str(tiny_model_dir),
        "--weight-bits",
        "16",
        "--m-values",
        "1,8",
        "--threads",
        "1",
    ]
    assert main([*argv, *FAST, "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "memory bandwidth" in stdout and "16-bit" in stdout and "compute ceiling" in stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "floor" and data["config"]["dtype"] == "float32"
    assert data["decode_floor"]["weight_bits"] == 16 and data["decode_floor"]["max_steps_per_s"] > 0
    assert data["model"]["params_per_token"] > 0 and data["compute_ceiling"]["max_tokens_per_s"] > 0
    assert data["config"]["threads"] == [1] and [r["threads"] for r in data["matmul"]] == [1, 1]

    # no model: the machine's figures only, at the default 576 x 1536 shape
    assert main(["floor", "--dtype", "bfloat16", "--m-values", "1", *FAST]) == 0
    assert "K=576, N=1536" in capsys.readouterr().out
    assert main(["floor", "--weight-bits", "3"]) == 2
    assert main(["floor", "--model-dir", str(tmp_path / "missing"), *FAST]) == 1


@pytest.mark.timeout(10)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
def test_floor_cli_without_cuda(capsys: pytest.CaptureFixture) -> None:
    assert main(["floor", "--device", "cuda", *FAST]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# baseline


@pytest.mark.timeout(10)
def test_baseline_arithmetic() -> None:
    runs = [
        BaselineRun(batch_size=4, generate_s=1.0, first_token_s=0.1, generated_tokens=40),
        BaselineRun(batch_size=4, generate_s=2.0, first_token_s=0.2, generated_tokens=40),
        BaselineRun(batch_size=4, generate_s=1.1, first_token_s=0.2, generated_tokens=40),
    ]
    s = summarize_baseline(runs, max_new_tokens=10)
    assert s.batch_size == 4 and s.runs == 3
    assert s.generate_s == pytest.approx(1.1) and s.first_token_s == pytest.approx(0.2)
    # medians: 40 / 1.1 tokens/s; (1.1 - 0.2) / 9 = 100 ms per step; 4 / 0.1 = 40 decode tokens/s
    assert s.output_tokens_per_s == pytest.approx(40 / 1.1)
    assert s.time_per_step_ms == pytest.approx(100.0)
    assert s.decode_tokens_per_s == pytest.approx(40.0)


@pytest.mark.timeout(60)
def test_baseline_on_tiny_model(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "baseline.json"
    floor = tmp_path / "floor.json"
    floor.write_text(json.dumps(synthetic_floor()))
    argv = [
        "baseline", "--floor", str(floor), "--model-dir", str(tiny_model_dir), "--batch-sizes", "1,2",
        "--max-new-tokens", "4", "--warmups", "0", "--runs", "1", "--output", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "out tok/s" in stdout and "versus the floor" in stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "baseline" and data["environment"]["dtype"] == "float32"
    assert [r["batch_size"] for r in data["results"]] == [1, 2]
    assert [r["generated_tokens"] for r in data["runs"]] == [4, 8]  # every row exactly max-new-tokens
    for r in data["results"]:
        assert r["output_tokens_per_s"] > 0 and r["time_per_step_ms"] > 0 and r["decode_tokens_per_s"] > 0
    assert [v["batch_size"] for v in data["versus_floor"]] == [1, 2]
    assert data["versus_floor"][0]["fraction_of_decode_floor"] > 0
    assert main(["baseline", "--model-dir", str(tiny_model_dir), "--max-new-tokens", "1"]) == 2
    assert main(["baseline", "--model-dir", str(tmp_path / "missing"), "--no-progress"]) == 1


# ---------------------------------------------------------------------------------------------------------
# A ceiling per arithmetic (--ceilings)


@pytest.mark.timeout(10)
def test_each_arithmetic_gets_its_own_ceiling_from_its_largest_measured_m() -> None:
    model = synthetic_model()
    bandwidth = {"read_gbps": 21.0, "copy_gbps": 15.0, "bytes": 1}
    shape = {"k": 576, "n": 1536}
    float32 = [{"m": 1, "gflops": 20.0, **shape}, {"m": 256, "gflops": 2 * 134_515_008 * 1000 / 1e9, **shape}]
    ceiling_matmul = {
        "float32": float32,
        "bfloat16": [{"m": 1, "gflops": 30.0}, {"m": 256, "gflops": 4 * 134_515_008 * 1000 / 1e9}],
        # torch refused the int8 product at the largest M: the ceiling comes from the largest that ran
        "int8": [{"m": 32, "gflops": 3 * 134_515_008 * 1000 / 1e9}, {"m": 256, "gflops": None, "error": "x"}],
    }
    report = build_report(FloorConfig(ceilings=("float32", "bfloat16", "int8")), bandwidth, float32, model,
                          ceiling_matmul)  # fmt: skip
    ceilings = report.compute_ceilings
    assert ceilings["float32"]["max_tokens_per_s"] == pytest.approx(1000.0)
    assert ceilings["bfloat16"]["max_tokens_per_s"] == pytest.approx(2000.0)
    assert ceilings["int8"]["m"] == 32 and ceilings["int8"]["max_tokens_per_s"] == pytest.approx(1500.0)
    summary = format_summary(report)
    assert "bfloat16 products: M=1: 30.0, M=256" in summary and "-> 2000 tokens/s at most" in summary
    assert "int8 products: M=32" in summary and "M=256: refused (x) GOP/s" in summary

    floor = report.to_json()
    # a multi-stream figure against the ceiling of the arithmetic it used, else the --dtype one
    assert versus_floor(floor, 32, 10.0, 500.0, "bfloat16")["fraction_of_compute_ceiling"] == pytest.approx(
        0.25
    )
    assert versus_floor(floor, 32, 10.0, 500.0, "int8")["fraction_of_compute_ceiling"] == pytest.approx(1 / 3)
    assert versus_floor(floor, 32, 10.0, 500.0)["fraction_of_compute_ceiling"] == pytest.approx(0.5)
    assert versus_floor(floor, 32, 10.0, 500.0, "float16")["fraction_of_compute_ceiling"] == pytest.approx(
        0.5
    )
    row = versus_floor(floor, 32, 10.0, 500.0, "bfloat16")
    assert "compute ceiling 2000 tokens/s (bfloat16 products)" in format_versus(floor, [row], "bfloat16")


@pytest.mark.timeout(120)
def test_floor_cli_measures_the_bfloat16_and_int8_ceilings(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "floor.json"
    argv = ["floor", "--model-dir", str(tiny_model_dir), "--m-values", "1,32", "--threads", "1",
            "--ceilings", "float32,bfloat16,int8", "--output", str(out)]  # fmt: skip
    assert main([*argv, *FAST]) == 0
    stdout = capsys.readouterr().out
    assert "bfloat16 products:" in stdout and "int8 products:" in stdout
    data = json.loads(out.read_text())
    assert set(data["ceiling_matmul"]) == {"float32", "bfloat16", "int8"}
    assert data["ceiling_matmul"]["float32"] == data["matmul"]  # --dtype's rows, measured once
    for arithmetic in ("float32", "bfloat16"):
        assert [r["m"] for r in data["ceiling_matmul"][arithmetic]] == [1, 32]
        assert data["compute_ceilings"][arithmetic]["max_tokens_per_s"] > 0
    int8 = data["ceiling_matmul"]["int8"]
    assert all((r["gflops"] or 0) > 0 or r["error"] for r in int8)
    assert main(["floor", "--ceilings", "float32,int3", *FAST]) == 2
