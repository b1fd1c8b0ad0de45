"""Figures for the end-to-end results: what people look at before reading the JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_e2e(result: dict[str, Any], dest: Path) -> Path:
    """Speedup over plain decoding vs concurrency, one line per drafter, one panel per
    dataset x temperature."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if r["drafter"] != "plain" and r.get("speedup_vs_plain")]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    temps = list(dict.fromkeys(r["temperature"] for r in rows))
    fig, axes = plt.subplots(len(temps), len(datasets), squeeze=False, sharey=True,
                             figsize=(4 * len(datasets), 3.2 * len(temps)))
    for i, t in enumerate(temps):
        for j, d in enumerate(datasets):
            ax = axes[i][j]
            for name in dict.fromkeys(r["drafter"] for r in rows):
                pts = sorted((r["concurrency"], r["speedup_vs_plain"]) for r in rows
                             if (r["drafter"], r["dataset"], r["temperature"]) == (name, d, t))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{d}, T={t:g}")
            ax.set_xlabel("concurrency")
            if j == 0:
                ax.set_ylabel("output tok/s vs plain")
    axes[0][0].legend()
    return _save(fig, f"{result['model']}, k={result['k']}, {result['device']}, vLLM "
                      f"{result['vllm_version']} (real acceptance)", dest)


def plot_synthetic(result: dict[str, Any], dest: Path) -> Path:
    """CORAL / dense-head EAGLE throughput vs batch, one line per synthetic acceptance
    length, one panel per target shape."""
    plt = _pyplot()
    shapes = list(dict.fromkeys(r["shape"] for r in result["ratios"]))
    fig, axes = plt.subplots(1, len(shapes), squeeze=False, sharey=True,
                             figsize=(4.5 * len(shapes), 3.4))
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in result["ratios"] if r["shape"] == shape and r["coral_vs_eagle"]]
        for length in sorted({r["synthetic_acceptance_length"] for r in rs}):
            pts = sorted((r["batch"], r["coral_vs_eagle"]) for r in rs
                         if r["synthetic_acceptance_length"] == length)
            ax.plot(*zip(*pts), marker="o", label=f"acceptance {length:g}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(shape)
        ax.set_xlabel("batch")
        ax.set_ylabel("CORAL tok/s / EAGLE tok/s")
        ax.legend(fontsize=8)
    return _save(fig, f"SYNTHETIC acceptance, dummy weights, k={result['k']}, "
                      f"{result['device']}, vLLM {result['vllm_version']}", dest)


def _save(fig: Any, title: str, dest: Path) -> Path:
    """Every figure states card, vLLM version and whether acceptance was real."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    _pyplot().close(fig)
    return dest


def plot_file(path: str | Path) -> Path:
    """PNG next to a result JSON, chosen by its kind."""
    path = Path(path)
    result = json.loads(path.read_text())
    plot = plot_synthetic if "ratios" in result else plot_e2e
    return plot(result, path.with_suffix(".png"))
