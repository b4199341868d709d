"""What an ASHA search found: its samples ranked by the metric it compared.

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
    """One row per sample under `folder`, best first; samples without the metric last."""
    rows = []
    for path in sorted(Path(folder).rglob(RECORD)):
        try:
            record = read_record(path.parent)
        except RecordError as exc:
            rows.append({"run": path.parent.name, "status": f"unreadable ({exc})", "iteration": None, metric: None})
            continue
        status = record.status
        if status == "stopped":
            status = f"stopped at {record.iteration}"
        elif status != "complete":
            status = f"{status} ({describe_error(record.error)})" if record.error else status
        value = last_metric(record.curves, metric)
        row = {"run": record.name, **{k: sampled_value(record.config, k) for k in keys}, "status": status, "iteration": record.iteration}
        rows.append(row | {metric: value})
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r[metric] is None or math.isnan(r[metric]), sign * (r[metric] or 0.0)))


def search_table(folder: Path | str, keys: list[str], metric: str, mode: str = "max") -> str:
    """The samples as a markdown table, best first, with a line naming the best values."""
    rows = search_rows(folder, keys, metric, mode)
    if not rows:
        return f"no samples under {folder}\n"
    columns = ["run", *keys, metric, "status"]

    def cell(value) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    best = rows[0]
    if best[metric] is not None:
        chosen = ", ".join(f"{k}={cell(best[k])}" for k in keys)
        lines.append(f"\nbest by {metric} ({mode}): {chosen} ({best['run']}, {best['status']}). A search chooses; "
                     "report the chosen values from a FIFO sweep over seeds.")
    return "\n".join(lines) + "\n"
