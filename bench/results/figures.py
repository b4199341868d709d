"""Figures made from run records alone: curves over training and the selectors scored
over training (the leaderboard's own figure is in leaderboard.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bench.results.record import read_record


def pyplot():
    """matplotlib's pyplot without a display (figures are files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(frame, path: Path) -> None:
    """mIoU and selection precision over iterations from run records, mean over seeds."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    by_method: dict[str, list[list[dict]]] = {}
    for run, method in zip(frame["run"].to_list(), frame["method"].to_list()):
        by_method.setdefault(method, []).append(read_record(run).curves)
    colours = plt.get_cmap("tab20").colors
    for i, (method, runs) in enumerate(sorted(by_method.items())):
        for ax, key in ((a1, "val_miou"), (a2, "sel_precision")):
            points: dict[int, list[float]] = {}
            for curves in runs:
                for c in curves:
                    if c.get(key) is not None:
                        points.setdefault(c["iter"], []).append(c[key])
            if points:
                xs = sorted(points)
                ax.plot(xs, [100 * np.mean(points[x]) for x in xs], marker="o", ms=3, label=method, color=colours[i % 20])
    a1.set(xlabel="iteration", ylabel="val mIoU", title="mIoU over training (mean over seeds)")
    a2.set(xlabel="iteration", ylabel="selection precision", title="Selection precision over training")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selection_over_training(frame) -> dict[str, list[dict]]:
    """The scores at the bank points of every run in `frame` that has them, by training method."""
    points: dict[str, list[dict]] = {}
    for run, method in zip(frame["run"].to_list(), frame["method"].to_list()):
        for point in read_record(run).selection_over_training or []:
            points.setdefault(method, []).append(point)
    return points


def plot_selection_over_training(probes: dict[str, list[dict]], path: Path, names: list[str] | None = None) -> None:
    """The paper's premise over training: each selector's precision gain over the
    matched-coverage threshold (with its interval) and AUROC, and the teacher's calibration
    (ECE; share of wrong pixels with C >= 0.95). Mean over the runs of each training method."""
    plt = pyplot()
    methods = sorted(probes)
    fig, axes = plt.subplots(len(methods), 3, figsize=(15, 3.8 * len(methods)), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for row, method in zip(axes, methods):
        by_iter: dict[int, list[dict]] = {}
        for p in probes[method]:
            by_iter.setdefault(p["iter"], []).append(p)
        xs = sorted(by_iter)
        runs = max(len(v) for v in by_iter.values())
        selectors = names or sorted({s for p in probes[method] for s in p["selectors"]})
        for i, name in enumerate(selectors):
            colour = colours[i % 20]

            def mean(key, index=None, name=name):
                values = []
                for x in xs:
                    got = [p["selectors"][name].get(key) for p in by_iter[x] if name in p["selectors"]]
                    got = [g[index] if index is not None and g is not None else g for g in got]
                    got = [g for g in got if g is not None and not (isinstance(g, float) and math.isnan(g))]
                    values.append(100 * np.mean(got) if got else np.nan)
                return np.array(values)

            gain = mean("precision_gain")
            if not np.all(np.isnan(gain)):
                row[0].plot(xs, gain, marker="o", ms=3, color=colour, label=name)
                row[0].fill_between(xs, mean("gain_ci", 0), mean("gain_ci", 1), color=colour, alpha=0.12)
            row[1].plot(xs, mean("auroc") / 100, marker="o", ms=3, color=colour, label=name)
        row[0].axhline(0, color="k", lw=0.8)
        row[0].set(xlabel="iteration", ylabel="precision gain (points)", title=f"{method}: gain over the matched-coverage threshold")
        row[1].set(xlabel="iteration", ylabel="AUROC", title="AUROC of each selector's weight")
        for key, label in (("ece", "ECE"), ("wrong_confident_share", "wrong pixels with C ≥ 0.95"), ("confident_error_rate", "error rate among C ≥ 0.95")):
            values = [[np.nan if p.get(key) is None else p[key] for p in by_iter[x]] for x in xs]  # NaN is stored as null
            row[2].plot(xs, [100 * np.nanmean(v) if not np.all(np.isnan(v)) else np.nan for v in values], marker="o", ms=3, label=label)
        row[2].set(xlabel="iteration", ylabel="%", title=f"teacher calibration (mean over {runs} run{'s' * (runs > 1)})")
        row[0].legend(fontsize=6, ncol=2)
        row[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bank_scores(rows: list[dict], path: Path, names: list[str] | None = None) -> None:
    """Each metric of `bench.results.scoring.score_bank` against training progress, one line
    per selector: does confidence fail more as training goes on?"""
    plt = pyplot()
    metrics = (("precision_gain", "precision gain over the same-size threshold (points)"), ("precision", "precision (%)"),
               ("coverage", "coverage (%)"), ("recall", "recall (%)"), ("auroc", "AUROC of the weight"))
    selectors = names or sorted({r["name"] for r in rows if "coverage" in r})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8))
    colours = plt.get_cmap("tab20").colors
    for i, name in enumerate(selectors):
        mine = sorted((r for r in rows if r["name"] == name), key=lambda r: r["progress"])
        xs = [r["progress"] for r in mine]
        for ax, (key, _) in zip(axes, metrics):
            ys = [np.nan if r.get(key) is None else r[key] * (1 if key == "auroc" else 100) for r in mine]
            ax.plot(xs, ys, marker="o", ms=3, color=colours[i % 20], label=name)
            if key == "precision_gain":
                low = [np.nan if not r.get("gain_ci") else 100 * r["gain_ci"][0] for r in mine]
                high = [np.nan if not r.get("gain_ci") else 100 * r["gain_ci"][1] for r in mine]
                ax.fill_between(xs, low, high, color=colours[i % 20], alpha=0.1)
    for ax, (key, label) in zip(axes, metrics):
        ax.set(xlabel="training progress", ylabel=label)
        if key == "precision_gain":
            ax.axhline(0, color="k", lw=0.8)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
