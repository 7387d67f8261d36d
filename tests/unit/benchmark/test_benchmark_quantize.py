"""benchmark/quantize.py: the figures and the table (the runs themselves start real servers: docs/benchmarks.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.quantize import DEFAULT_TEXT, ModeResult, format_table, perplexity

pytestmark = pytest.mark.timeout(60)


def test_perplexity_skips_the_first_token_and_nan() -> None:
    assert perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    assert perplexity([float("nan"), math.log(0.25), math.log(0.25)]) == pytest.approx(4.0)


def test_table_rows_gap_and_positions() -> None:
    full = ModeResult("none", weight_mib=513, ppl_server=14.5, ppl_library=14.5)
    ct2 = ModeResult(
        "ct2", weight_mib=129, ppl_server=15.5, ppl_library=15.0, ms_per_token={"50": 20.0, "500": 25.0}
    )
    table = format_table([full, ct2, ModeResult("bitsandbytes", errors=["RuntimeError: boom"])], 32)
    assert "output tok/s, 32 streams" in table
    assert "| none | 513 |" in table and "+0.00%" in table and "+3.33%" in table
    assert "ratio 1.25" in table and "bitsandbytes: RuntimeError: boom" in table


def test_the_shipped_text_is_long_enough() -> None:
    text = DEFAULT_TEXT.read_text()
    assert text.startswith("\n") or "Apache License" in text[:200]
    assert len(text.split()) > 1000  # well over 1,024 tokens for any BPE vocabulary


def test_unknown_mode_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", "--modes", "none,gptq"]) == 1
    assert "unknown modes ['gptq']" in capsys.readouterr().err


def test_paged_modes_take_the_shards_logged_weights(tmp_path: Path) -> None:
    """int8/int4 run in the paged backend's own kernels: their weight memory is the shard's log line."""
    from benchmark.quantize import MODES, PAGED_MODES, _shard_weights_mib

    assert set(PAGED_MODES) <= set(MODES)
    log = tmp_path / "int4-cached.log"
    log.write_text("... INFO Weights on rank 0/1: 104.9 MB\n")
    assert _shard_weights_mib(log) == pytest.approx(104.9e6 / 2**20)
    log.write_text("no such line\n")
    assert _shard_weights_mib(log) is None
