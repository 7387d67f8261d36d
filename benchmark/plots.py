"""PNG plots of ``serve`` results, one or several runs (servers) on the same axes.

- ``throughput_vs_concurrency.png`` / ``throughput_vs_request_rate.png``: output tokens/s per level (one file
  per kind of sweep present among the results);
- ``latency_vs_throughput.png``: TPOT p50 and TTFT p50 (ms) against output tokens/s, one point per level:
  the lower and further right a curve, the better the server.

Plots are drawn from the JSON results (``serve --output``), so a file written by any earlier run can be
compared with a new one. matplotlib is imported only here, with an actionable error when it is missing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THROUGHPUT_FILES = {
    "concurrency": "throughput_vs_concurrency.png",
    "request_rate": "throughput_vs_request_rate.png",
}
LATENCY_FILE = "latency_vs_throughput.png"
X_LABELS = {"concurrency": "concurrency (closed loop)", "request_rate": "request rate (requests/s, Poisson)"}


class PlotError(ValueError):
    """A results file that cannot be plotted, or matplotlib missing."""


@dataclass
class Series:
    """One run's points, in level order; a missing value is None (a level without successes)."""

    label: str
    mode: str  # "concurrency" or "request_rate"
    x: list[float]
    output_tokens_per_s: list[float]
    tpot_p50_ms: list[float | None]
    ttft_p50_ms: list[float | None]


def load_result(path: str | Path) -> dict[str, Any]:
    """Reads a ``serve`` results file; PlotError when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlotError(f"{path}: cannot read a results file: {e}") from e
    if (
        not isinstance(data, dict)
        or data.get("command") != "serve"
        or not isinstance(data.get("levels"), list)
    ):
        raise PlotError(f"{path}: not a results file of text-generation-benchmark serve")
    return data


def _ms(dist: dict[str, Any], key: str = "p50") -> float | None:
    value = dist.get(key) if isinstance(dist, dict) else None
    return None if value is None else 1000.0 * value


def series_of(result: dict[str, Any], label: str) -> Series:
    """The points of one results document (the ``to_json`` form of a ServeResult)."""
    levels = result["levels"]
    mode = result.get("mode") or (
        "request_rate" if levels and levels[0].get("request_rate") is not None else "concurrency"
    )
    x_key = "request_rate" if mode == "request_rate" else "concurrency"
    series = Series(label, mode, [], [], [], [])
    for level in levels:
        m = level["metrics"]
        series.x.append(float(level[x_key]))
        series.output_tokens_per_s.append(float(m["output_tokens_per_s"]))
        series.tpot_p50_ms.append(_ms(m["tpot_s"]))
        series.ttft_p50_ms.append(_ms(m["ttft_s"]))
    return series


def default_labels(results: Sequence[dict[str, Any]], paths: Sequence[str | Path] | None = None) -> list[str]:
    """Each run's ``label`` (stored by ``serve --label``), else its file name, else ``run N``."""
    labels = []
    for i, result in enumerate(results):
        label = result.get("label")
        if not label:
            label = Path(paths[i]).stem if paths else f"run {i + 1}"
        labels.append(str(label))
    return labels


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotError("plots need matplotlib: pip install matplotlib (or the project's test extras)") from e
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, axes


def _level_text(mode: str, x: float) -> str:
    return f"{x:g}/s" if mode == "request_rate" else f"c{x:g}"


def _throughput_plot(series: Sequence[Series], mode: str, path: Path) -> Path:
    figure, (ax,) = _figure(7, 4.5)
    xs = sorted({x for s in series for x in s.x})
    for s in series:
        ax.plot(s.x, s.output_tokens_per_s, marker="o", label=s.label)
    if mode == "concurrency" and xs and xs[0] > 0 and xs[-1] / xs[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(X_LABELS[mode])
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Throughput vs {'request rate' if mode == 'request_rate' else 'concurrency'}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    figure.savefig(path, dpi=120)
    return path


def _latency_plot(series: Sequence[Series], path: Path) -> Path:
    figure, axes = _figure(12, 4.5, ncols=2)
    panels = (("tpot_p50_ms", "TPOT p50 (ms)"), ("ttft_p50_ms", "TTFT p50 (ms)"))
    for ax, (field, name) in zip(axes, panels, strict=True):
        for s in series:
            points = [
                (tps, y, x)
                for tps, y, x in zip(s.output_tokens_per_s, getattr(s, field), s.x, strict=True)
                if y is not None
            ]
            if not points:
                continue
            line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=s.label)[0]
            for tps, y, x in points:
                ax.annotate(
                    _level_text(s.mode, x),
                    (tps, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line.get_color(),
                )
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(name)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{name.split()[0]} p50 vs throughput")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    figure.savefig(path, dpi=120)
    return path


def plot_results(
    results: Sequence[dict[str, Any]], output_dir: str | Path, labels: Sequence[str] | None = None
) -> list[Path]:
    """Draws the results (one series each, named by ``labels`` or default_labels) into ``output_dir``
    (created); returns the paths of the PNG files written."""
    if not results:
        raise PlotError("nothing to plot: no results")
    if labels is None:
        labels = default_labels(results)
    if len(labels) != len(results):
        raise PlotError(f"{len(labels)} label(s) for {len(results)} results file(s)")
    series = [series_of(result, label) for result, label in zip(results, labels, strict=True)]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for mode, name in THROUGHPUT_FILES.items():
        of_mode = [s for s in series if s.mode == mode]
        if of_mode:
            paths.append(_throughput_plot(of_mode, mode, output_dir / name))
    paths.append(_latency_plot(series, output_dir / LATENCY_FILE))
    return paths


def plot_files(
    paths: Sequence[str | Path], output_dir: str | Path, labels: Sequence[str] | None = None
) -> list[Path]:
    """plot_results over results files (the ``plot`` command)."""
    results = [load_result(path) for path in paths]
    return plot_results(results, output_dir, labels or default_labels(results, paths))
