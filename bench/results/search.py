"""What an ASHA search found: its samples ranked, per trial of the grid.

A search's samples share a (method, seed) cell and differ in the values it sampled, so
the leaderboard (one run per cell, paired statistics over seeds) does not apply; and a
search chooses hyper-parameters at a reduced budget, it never reports a result. This
table says which values won, and which samples the scheduler stopped where.
"""

from __future__ import annotations

import math
from pathlib import Path

from bench.results.record import RECORD, RecordError, describe_error, read_record


def sampled_value(config: dict, key: str):
    """A search-space key's value in a run's config (`selector.alpha` is a selector parameter)."""
    if key.startswith("selector."):
        return config.get("selector_params", {}).get(key.split(".", 1)[1])
    return config.get(key)


def last_metric(curves: list[dict], metric: str) -> float | None:
    """The metric at the run's last evaluation: what the scheduler compared last."""
    values = [point[metric] for point in curves if isinstance(point.get(metric), (int, float))]
    return values[-1] if values else None


def search_rows(folder: Path | str, keys: list[str], metric: str, mode: str = "max") -> list[dict]:
    """One row per sample under `folder` (`<trial>-<hash of its values>`), grouped by trial.
    Within a trial, the samples that went furthest come first (ASHA stopped the others for
    trailing at a rung), then by the metric at their last evaluation; no metric: last."""
    rows = []
    for path in sorted(Path(folder).rglob(RECORD)):
        trial = path.parent.name.rsplit("-", 1)[0]
        try:
            record = read_record(path.parent)
        except RecordError as exc:
            rows.append({"trial": trial, "run": path.parent.name, "status": f"unreadable ({exc})", "iteration": -1, metric: None})
            continue
        status = record.status
        if status == "stopped":
            status = f"stopped at {record.iteration}"
        elif status != "complete":
            status = f"{status} ({describe_error(record.error)})" if record.error else status
        row = {"trial": trial, "run": record.name, **{k: sampled_value(record.config, k) for k in keys}}
        rows.append(row | {"status": status, "iteration": record.iteration, metric: last_metric(record.curves, metric)})
    sign = -1.0 if mode == "max" else 1.0

    def rank(r: dict):
        missing = r[metric] is None or math.isnan(r[metric])
        return r["trial"], missing, -r["iteration"], 0.0 if missing else sign * r[metric]

    return sorted(rows, key=rank)


def search_table(folder: Path | str, keys: list[str], metric: str, mode: str = "max") -> str:
    """The samples as a markdown table, with a line per trial naming its best values."""
    rows = search_rows(folder, keys, metric, mode)
    if not rows:
        return f"no samples under {folder}\n"
    columns = ["run", *keys, metric, "status"]

    def cell(value) -> str:
        if value is None:
            return "–"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    lines.append("")
    for trial in dict.fromkeys(r["trial"] for r in rows):
        best = next(r for r in rows if r["trial"] == trial)
        if best[metric] is not None:
            chosen = ", ".join(f"{k}={cell(best[k])}" for k in keys)
            lines.append(f"{trial}: best by {metric} ({mode}) {chosen} ({best['run']}, {best['status']})")
    lines.append("A search chooses values; report them from a FIFO sweep over seeds.")
    return "\n".join(lines) + "\n"
