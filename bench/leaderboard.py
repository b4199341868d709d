"""Leaderboards from run records: polars groups, one table per protocol.

Every complete `record.json` under a folder is a row. Rows are grouped by the protocol
keys (dataset, protocol, backbone, budget, framework, normaliser); inside a group the
methods are rows and the splits (or any config key given with `by`) are columns of
mIoU mean ± std (n seeds). Selection quality and cost are averaged over the method's runs,
and each method is compared with `fixed` by a paired t-test over the seeds both have.
Supervised-only runs have no selector: they appear in every group with the same data,
backbone and budget. Records that are running or failed are listed, never dropped.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from scipy import stats

from bench.records import RECORD, describe_error

GROUP_KEYS = ("dataset", "protocol", "backbone", "budget", "framework", "normaliser")
SHARED_KEYS = GROUP_KEYS[:4]  # what a supervised-only run must share to join a group
BASELINE = "fixed"
FORMATS = ("markdown", "csv", "latex", "html")
# column -> True when higher is better, False when lower is, None when neither
SUMMARY_COLUMNS = {
    "miou_best_val": ("best-val mIoU", True, 100),
    "precision": ("precision", True, 100),
    "recall": ("recall", True, 100),
    "coverage": ("coverage", None, 100),
    "wall_s": ("wall s", False, 1),
    "selector_ms": ("selector ms/it", False, 1),
    "extra_passes": ("extra passes", False, 1),
}


def _config_value(cfg: dict, key: str) -> Any:
    if key.startswith("selector."):
        param = key.split(".", 1)[1]
        if param in cfg.get("selector_params", {}):
            return cfg["selector_params"][param]
        from bench.selection import selector_params

        try:
            return selector_params(cfg["selector"]).get(param)
        except ValueError:
            return None
    if key not in cfg:
        raise KeyError(f"--by {key!r} is not a config key (e.g. split, seed, lr, selector.alpha)")
    value = cfg[key]
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def method_label(cfg: dict, by: str | None = None) -> str:
    if cfg["framework"] == "supervised":
        return "supervised"
    parts = [cfg["selector"]]
    params = {k: v for k, v in sorted(cfg.get("selector_params", {}).items()) if by != f"selector.{k}"}
    if params:
        parts.append("(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")")
    if cfg.get("csl_mask_view") and by != "csl_mask_view":
        parts.append("+ mask view")
    if cfg.get("ema_teacher") and by != "ema_teacher":
        parts.append("+ EMA")
    return " ".join(parts)


def split_label(cfg: dict) -> str:
    return f"{cfg['labeled']} labels" if cfg["split"] == "default" else cfg["split"]


def record_row(record: dict, path: Path, by: str | None = None) -> dict:
    cfg = record["config"]
    final = record.get("final") or {}
    sel = record.get("selection") or {}
    cost = record.get("cost") or {}
    return {
        "run": str(path.parent),
        "status": record.get("status", "unknown"),
        "error": describe_error(record.get("error")) or None,
        "dataset": cfg["dataset"],
        "protocol": cfg["protocol"],
        "backbone": cfg["backbone"],
        "budget": cfg["iters"],
        "framework": cfg["framework"],
        "normaliser": cfg["normaliser"],
        "column": str(_config_value(cfg, by)) if by else split_label(cfg),
        "method": method_label(cfg, by),
        "seed": cfg["seed"],
        "miou": final.get("miou"),
        "miou_best_val": final.get("miou_best_val"),
        "precision": sel.get("precision"),
        "recall": sel.get("recall"),
        "coverage": sel.get("coverage"),
        "wall_s": cost.get("wall_s"),
        # no selector, no selector cost: left empty rather than a winning 0
        "selector_ms": None if cfg["framework"] == "supervised" else cost.get("selector_ms_per_iter"),
        "extra_passes": None if cfg["framework"] == "supervised" else cost.get("extra_forward_passes"),
    }


def load_rows(root: str | Path, by: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(complete runs, the others) as data frames; unreadable records count as failed."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    rows, others = [], []
    for path in sorted(root.rglob(RECORD)):
        try:
            record = json.loads(path.read_text())
            row = record_row(record, path, by)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, KeyError) and by and "--by" in str(exc):
                raise
            others.append({"run": str(path.parent), "status": "unreadable", "error": str(exc)})
            continue
        (rows if row["status"] == "complete" and row["miou"] is not None else others).append(row)
        if row["status"] == "complete" and row["miou"] is None:
            row["error"] = row["error"] or "complete, but its final mIoU is undefined"
    schema_cols = ["run", "status", "error"]
    frame = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()
    other = pl.DataFrame([{k: r.get(k) for k in schema_cols} for r in others], schema={k: pl.Utf8 for k in schema_cols})
    return frame, other


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]] = field(default_factory=list)
    numeric: pl.DataFrame | None = None


def _fmt(mean: float | None, scale: float, digits: int = 1) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean * scale:.{digits}f}"


def paired_p_value(method: dict[int, float], baseline: dict[int, float]) -> tuple[float, int]:
    """Two-sided paired t-test over the seeds both have; NaN with fewer than two pairs."""
    seeds = sorted(set(method) & set(baseline))
    if len(seeds) < 2:
        return math.nan, len(seeds)
    a = [method[s] for s in seeds]
    b = [baseline[s] for s in seeds]
    if all(x == y for x, y in zip(a, b)):
        return 1.0, len(seeds)
    return float(stats.ttest_rel(a, b).pvalue), len(seeds)


def build_tables(frame: pl.DataFrame) -> list[Table]:
    if frame.is_empty():
        return []
    semi = frame.filter(pl.col("framework") != "supervised")
    supervised = frame.filter(pl.col("framework") == "supervised")
    groups = semi.select(GROUP_KEYS).unique().sort(GROUP_KEYS).rows(named=True)
    if not groups:
        groups = supervised.select(GROUP_KEYS).unique().sort(GROUP_KEYS).rows(named=True)
    tables = []
    for group in groups:
        members = frame.filter(
            pl.all_horizontal([pl.col(k) == group[k] for k in GROUP_KEYS])
            | (
                (pl.col("framework") == "supervised")
                & pl.all_horizontal([pl.col(k) == group[k] for k in SHARED_KEYS])
            )
        )
        tables.append(_group_table(group, members))
    return tables


def _group_table(group: dict, members: pl.DataFrame) -> Table:
    columns = sorted(members["column"].unique().to_list(), key=_natural)
    per_cell = (
        members.group_by("method", "column")
        .agg(
            pl.col("miou").mean().alias("mean"),
            pl.col("miou").std(ddof=1).alias("std"),
            pl.len().alias("n"),
        )
        .sort("method", "column")
    )
    summary = members.group_by("method").agg([pl.col(c).mean() for c in SUMMARY_COLUMNS]).sort("method")
    methods = sorted(summary["method"].to_list(), key=lambda m: (m != "supervised", m != BASELINE, m))
    seeds = {
        (m, c): dict(zip(sub["seed"].to_list(), sub["miou"].to_list()))
        for (m, c), sub in members.group_by("method", "column", maintain_order=True)
    }
    cells = {(r["method"], r["column"]): r for r in per_cell.iter_rows(named=True)}
    sums = {r["method"]: r for r in summary.iter_rows(named=True)}

    header = ["method"] + [f"mIoU {c}" for c in columns] + [f"p vs {BASELINE} {c}" if len(columns) > 1 else f"p vs {BASELINE}" for c in columns]
    header += [name for name, _, _ in SUMMARY_COLUMNS.values()]
    rows, numeric_rows, means = [], [], []
    for m in methods:
        row, mean_row = [m], [None]
        for c in columns:
            cell = cells.get((m, c))
            if cell is None:
                row.append("–")
                mean_row.append(None)
                continue
            std = "–" if cell["std"] is None or math.isnan(cell["std"]) else f"{100 * cell['std']:.1f}"
            row.append(f"{100 * cell['mean']:.1f} ± {std} ({cell['n']})")
            mean_row.append(cell["mean"])
        for c in columns:
            if m == BASELINE or (m, c) not in seeds or (BASELINE, c) not in seeds:
                row.append("–")
            else:
                p, n = paired_p_value(seeds[(m, c)], seeds[(BASELINE, c)])
                row.append("–" if math.isnan(p) else f"{p:.3f} ({n})")
                numeric_rows.append({"method": m, "column": c, "p_vs_fixed": p, "pairs": n})
            mean_row.append(None)
        for key, (_, _, scale) in SUMMARY_COLUMNS.items():
            value = sums[m][key]
            row.append(_fmt(value, scale, 1 if scale == 100 else 2 if key == "selector_ms" else 0))
            mean_row.append(value)
        rows.append(row)
        means.append(mean_row)
    directions = [None] + [True] * len(columns) + [None] * len(columns) + [d for _, d, _ in SUMMARY_COLUMNS.values()]
    bold = [[False] * len(header) for _ in rows]
    for j, direction in enumerate(directions):
        values = [r[j] for r in means]
        present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if direction is None or len(present) < 2:
            continue
        best = max(present) if direction else min(present)
        for i, v in enumerate(values):
            bold[i][j] = v == best
    title = ", ".join(f"{k}={group[k]}" for k in GROUP_KEYS)
    numeric = per_cell.join(pl.DataFrame(numeric_rows, schema={"method": pl.Utf8, "column": pl.Utf8, "p_vs_fixed": pl.Float64, "pairs": pl.Int64}), on=["method", "column"], how="left")
    numeric = numeric.join(summary, on="method", how="left").with_columns([pl.lit(str(group[k])).alias(k) for k in GROUP_KEYS])
    return Table(title, header, rows, bold, numeric)


def _natural(text: str):
    head = text.split(" ")[0]
    try:
        return (0, float(head), text)
    except ValueError:
        return (1, 0.0, text)


def render(tables: list[Table], others: pl.DataFrame, fmt: str = "markdown") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "csv":
        frames = [t.numeric for t in tables if t.numeric is not None]
        return pl.concat(frames, how="diagonal").write_csv() if frames else ""
    parts = [_render_table(t, fmt) for t in tables]
    if not tables:
        parts.append("no complete runs found")
    if others.height:
        listing = [f"{r['run']}: {r['status']}" + (f" ({r['error']})" if r["error"] else "") for r in others.iter_rows(named=True)]
        if fmt == "html":
            parts.append("<p>Not in the tables:</p><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in listing) + "</ul>")
        elif fmt == "latex":
            parts.append("% not in the tables:\n" + "\n".join(f"% {x}" for x in listing))
        else:
            parts.append("Not in the tables (running, failed, skipped or unreadable):\n" + "\n".join(f"- {x}" for x in listing))
    return "\n\n".join(parts) + "\n"


def _render_table(t: Table, fmt: str) -> str:
    def cell(text: str, bold: bool) -> str:
        if fmt == "markdown":
            return f"**{text}**" if bold else text
        if fmt == "latex":
            text = text.replace("±", r"$\pm$").replace("_", r"\_").replace("%", r"\%")
            return rf"\textbf{{{text}}}" if bold else text
        text = html.escape(text)
        return f"<b>{text}</b>" if bold else text

    body = [[cell(x, b) for x, b in zip(row, flags)] for row, flags in zip(t.rows, t.bold)]
    if fmt == "markdown":
        lines = [f"### {t.title}", "", "| " + " | ".join(t.header) + " |", "|" + "|".join("---" for _ in t.header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    if fmt == "latex":
        head = " & ".join(cell(h, False) for h in t.header)
        lines = [f"% {t.title}", r"\begin{tabular}{l" + "r" * (len(t.header) - 1) + "}", r"\toprule", head + r" \\", r"\midrule"]
        lines += [" & ".join(r) + r" \\" for r in body]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines)
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    return f"<h3>{html.escape(t.title)}</h3>\n<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def leaderboard(root: str | Path, fmt: str = "markdown", by: str | None = None) -> str:
    frame, others = load_rows(root, by)
    return render(build_tables(frame), others, fmt)
