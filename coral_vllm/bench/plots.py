"""Figures for the benchmark results: what people look at before reading the JSON."""

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
    """CORAL / dense-head EAGLE throughput vs batch (solid), and CORAL / static-vocabulary
    drafter (dashed) where it ran, one colour per synthetic acceptance length, one panel
    per target shape."""
    plt = _pyplot()
    shapes = list(dict.fromkeys(r["shape"] for r in result["ratios"]))
    fig, axes = plt.subplots(1, len(shapes), squeeze=False, sharey=True,
                             figsize=(4.5 * len(shapes), 3.4))
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in result["ratios"] if r["shape"] == shape]
        for length in sorted({r["synthetic_acceptance_length"] for r in rs}):
            colour = None
            for key, style, label in (("coral_vs_eagle", "-", "vs EAGLE"),
                                      ("coral_vs_static", "--", "vs static")):
                pts = sorted((r["batch"], r[key]) for r in rs
                             if r["synthetic_acceptance_length"] == length and r.get(key))
                if pts:
                    line, = ax.plot(*zip(*pts), marker="o", ls=style, color=colour,
                                    label=f"acceptance {length:g}, {label}")
                    colour = line.get_color()
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(shape)
        ax.set_xlabel("batch")
        ax.set_ylabel("CORAL tok/s / other drafter's tok/s")
        ax.legend(fontsize=8)
    return _save(fig, f"SYNTHETIC acceptance, dummy weights, k={result['k']}, "
                      f"{result['device']}, vLLM {result['vllm_version']}", dest)


def plot_lm_head(result: dict[str, Any], dest: Path) -> Path:
    """Grouped top-1 kernel speedup over the dense head vs active fraction, one line per
    token count, one panel per head shape."""
    plt = _pyplot()
    rows = result["rows"]
    shapes = sorted({(r["d"], r["vocab"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
    for ax, (d, vocab) in zip(axes[0], shapes):
        for n in sorted({r["tokens"] for r in rows}):
            sel = sorted((r for r in rows if (r["d"], r["vocab"], r["tokens"]) == (d, vocab, n)),
                         key=lambda r: r["active_fraction"])
            ax.plot([r["active_fraction"] for r in sel],
                    [r["dense_ms"] / r["grouped_ms"] for r in sel], marker="o", label=f"n={n}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"d={d}, V={vocab}")
        ax.set_xlabel("active fraction")
        ax.set_ylabel("speedup vs dense (top-1 kernel)")
        ax.legend(fontsize=7)
    return _save(fig, f"grouped LM head vs dense, {result['num_groups']} groups, "
                      f"{result['device']}", dest)


def plot_learning_curve(result: dict[str, Any], dest: Path) -> Path:
    """Held-out offline tau against training tokens per preset; stars: vLLM's tau."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for preset in dict.fromkeys(r["preset"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["preset"] == preset]
        line, = ax.plot([r["train_tokens"] / 1e6 for r in rows],
                        [r["heldout_tau"] for r in rows], marker="o", label=preset)
        for r in rows:
            if r["vllm_tau"] is not None:
                ax.scatter([r["train_tokens"] / 1e6], [r["vllm_tau"]], marker="*", s=120,
                           color=line.get_color(), zorder=3)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel(f"offline chain tau, k={result['k']}, dev prompts")
    ax.legend()
    return _save(fig, f"held-out tau, {result['device']}; stars: vLLM's tau", dest)


def plot_scaling(result: dict[str, Any], dest: Path) -> Path:
    """Training tokens/s against GPU count, with the linear line from the smallest."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    gpus = [r["gpus"] for r in result["rows"]]
    per_gpu = result["rows"][0]["tokens_per_s"] / gpus[0]
    ax.plot(gpus, [r["tokens_per_s"] / 1e3 for r in result["rows"]], marker="o",
            label="measured")
    ax.plot(gpus, [per_gpu * g / 1e3 for g in gpus], ls="--", color="gray", label="linear")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("training tokens/s (k)")
    ax.legend()
    return _save(fig, f"data-parallel training, {result['device']}", dest)


def _save(fig: Any, title: str, dest: Path) -> Path:
    """Every figure states its card (and for end-to-end runs the vLLM version and whether
    acceptance was real)."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    _pyplot().close(fig)
    return dest


def plot_file(path: str | Path) -> Path:
    """PNG next to a result JSON, chosen by its kind."""
    path = Path(path)
    result = json.loads(path.read_text())
    rows = result.get("rows") or [{}]
    if "copy_bandwidth_gbs" in result:
        plot = plot_lm_head
    elif "heldout_tau" in rows[0] and "preset" in rows[0]:
        plot = plot_learning_curve
    elif "scaling_efficiency" in rows[0]:
        plot = plot_scaling
    else:
        plot = plot_synthetic if "shape" in rows[0] else plot_e2e
    return plot(result, path.with_suffix(".png"))
