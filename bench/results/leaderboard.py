"""Leaderboards from run records: polars groups, one table per protocol.

Every complete `record.json` under a folder is a row. Rows are grouped by the protocol
keys (dataset, protocol, backbone, budget, framework, normaliser); inside a group the
methods are rows and the splits (or any config key given with `by`) are columns of
mIoU mean ± std (n seeds). Each method is compared with the reference method (`fixed`
unless told) over the seeds both have: the paired difference with its interval at the level
Holm's test of it used (so it excludes 0 exactly when the verdict is better or worse), the
p-value Holm-adjusted across the methods of the table, the minimum detectable difference
at 80% power, and a verdict, "inconclusive" where that MDE exceeds the effect of interest
(bench/results/statistics.py). A seed pairs only when both records used the same labelled
split and the same warm start (their hashes are in the records); where the pairs are fewer
than the seeds of the mean, the Δ cell gives the paired means too. Selection quality and
cost are averaged over the method's runs. Supervised-only runs have no selector: they appear
in every group with the same data, backbone and budget. Every record is in a table or in the
list under them with why: running, failed, skipped, unreadable, a warm start (a stage other
runs continue from, not a method), or a supervised run no semi-supervised table shares its
setting with. With two or more protocols or splits, methods are ranked across them
(Friedman, Nemenyi's critical difference).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from bench.results.record import RECORD, RecordError, RunRecord, describe_error, read_record
from bench.results.statistics import (
    ALPHA, Ranking, compare_paired, holm, holm_levels, minimum_detectable_difference, rank_methods, verdict,
)

GROUP_KEYS = ("dataset", "protocol", "backbone", "budget", "framework", "normaliser", "eval_split")
SHARED_KEYS = GROUP_KEYS[:4] + ("eval_split",)  # what a supervised-only run must share to join a group
BASELINE = "fixed"
EFFECT_OF_INTEREST = 2.0  # mIoU points: "no detectable difference" needs an MDE at most this, else "inconclusive"
WARMUP_FOLDER = "warmup"  # bench/orchestration/sweeps.py runs warm starts in <storage>/<sweep>/warmup/<trial>
OTHER_SCHEMA = {k: pl.Utf8 for k in ("run", "status", "error")}  # what is not in the tables, and why
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
        from bench.contract import selector_params

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


def _fingerprint(value) -> str | None:
    """One string for a record's split hashes (a mapping of file -> sha256)."""
    if value is None or isinstance(value, str):
        return value
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def record_row(record: RunRecord, path: Path, by: str | None = None) -> dict:
    cfg = record.config
    final = record.final or {}
    sel = record.selection or {}
    cost = record.cost or {}
    return {
        "run": str(path.parent),
        "status": record.status,
        "error": describe_error(record.error) or None,
        "dataset": cfg["dataset"],
        "protocol": cfg["protocol"],
        "backbone": cfg["backbone"],
        "budget": cfg["iters"] if by != "iters" else "see columns",  # pivoting the budget puts it in the columns
        "framework": cfg["framework"],
        "normaliser": cfg["normaliser"],
        "eval_split": final.get("eval_split", "val"),
        "column": str(_config_value(cfg, by)) if by else split_label(cfg),
        "method": method_label(cfg, by),
        "seed": cfg["seed"],
        # what makes two runs of one seed a pair: the labelled split and the warm start
        "split_sha": _fingerprint((record.splits or {}).get("sha256")),
        "warm_start": cfg.get("init_from_hash") or "none",
        "config_hash": record.config_hash,
        # a stage other runs continue from, not a method (load_rows adds those found by hash)
        "is_warm_start": path.parent.parent.name == WARMUP_FOLDER,
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
    """(complete runs, the others) as data frames; unreadable records count as failed. A
    complete run whose config hash another record continues from (`init_from_hash`) is marked
    a warm start wherever its folder is."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    rows, others = [], []
    for path in sorted(root.rglob(RECORD)):
        try:
            row = record_row(read_record(path.parent), path, by)
        except (RecordError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, KeyError) and by and "--by" in str(exc):
                raise
            others.append({"run": str(path.parent), "status": "unreadable", "error": str(exc)})
            continue
        (rows if row["status"] == "complete" and row["miou"] is not None else others).append(row)
        if row["status"] == "complete" and row["miou"] is None:
            row["error"] = row["error"] or "complete, but its final mIoU is undefined"
    continued_from = {r.get("warm_start") for r in rows + others} - {None}  # None: an unreadable record
    for row in rows:
        row["is_warm_start"] = row["is_warm_start"] or row["config_hash"] in continued_from
    frame = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()
    other = pl.DataFrame([{k: r.get(k) for k in OTHER_SCHEMA} for r in others], schema=OTHER_SCHEMA)
    return frame, other


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]] = field(default_factory=list)
    numeric: pl.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # the run folders the table shows


def _fmt(mean: float | None, scale: float, digits: int = 1) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean * scale:.{digits}f}"


def paired_values(
    method: dict[int, dict], reference: dict[int, dict], names: tuple[str, str] = ("method", "reference")
) -> tuple[list[float], list[float], list[str]]:
    """mIoU of the seeds both have, aligned; and why every other seed was left out (a seed
    of one side only, or one whose runs differ). A seed pairs when both runs used the same split
    and warm start (a record without them, e.g. written by hand, pairs by seed alone)."""
    a, b, unpaired = [], [], []
    for seed in sorted(set(method) | set(reference)):
        if seed not in method or seed not in reference:
            unpaired.append(f"seed {seed} (no {names[1] if seed in method else names[0]} run)")
            continue
        x, y = method[seed], reference[seed]
        clash = [what for key, what in (("split_sha", "labelled split"), ("warm_start", "warm start")) if x[key] and y[key] and x[key] != y[key]]
        if clash:
            unpaired.append(f"seed {seed} ({' and '.join(clash)} {'differ' if len(clash) > 1 else 'differs'})")
            continue
        a.append(x["miou"])
        b.append(y["miou"])
    return a, b, unpaired


def paired_p_value(method: dict[int, float], baseline: dict[int, float]) -> tuple[float, int]:
    """Two-sided paired t-test over the seeds both have; NaN with fewer than two pairs."""
    seeds = sorted(set(method) & set(baseline))
    result = compare_paired([method[s] for s in seeds], [baseline[s] for s in seeds])
    return result.p, result.n


def build_tables(frame: pl.DataFrame, reference: str = BASELINE, effect_of_interest: float = EFFECT_OF_INTEREST) -> list[Table]:
    """One table per protocol group; warm starts are left out (`left_out` lists them)."""
    if frame.is_empty():
        return []
    frame = frame.filter(~pl.col("is_warm_start"))
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
        tables.append(_group_table(group, members, reference, effect_of_interest))
    return tables


def left_out(frame: pl.DataFrame, tables: list[Table]) -> pl.DataFrame:
    """The complete runs that no table shows, each with why, for the list under the tables:
    a run silently missing from a table reads as a run that never happened."""
    shown = {run for t in tables for run in t.runs}
    rows = []
    for r in frame.iter_rows(named=True):
        if r["run"] in shown:
            continue
        if r["is_warm_start"]:
            why = "warm start: a stage other runs continue from, not a method"
        elif r["framework"] == "supervised":
            why = "supervised, and no semi-supervised table has " + ", ".join(f"{k}={r[k]}" for k in SHARED_KEYS)
        else:
            why = "in no table"  # no known path leads here; listed rather than lost
        rows.append({"run": r["run"], "status": r["status"], "error": why})
    return pl.DataFrame(rows, schema=OTHER_SCHEMA)


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def _comparisons(
    members: pl.DataFrame, methods: list[str], column: str, reference: str, where: str = "", effect_of_interest: float = EFFECT_OF_INTEREST
) -> tuple[dict[str, dict], list[str]]:
    """Per method (not the reference): its paired comparison with the reference in one
    column, Holm-adjusted across the methods, with its interval at the level Holm's test of it
    used (it excludes 0 exactly when the verdict is better or worse); and notes on the seeds
    that did not pair."""
    runs = {
        m: {r["seed"]: r for r in sub.iter_rows(named=True)}
        for (m,), sub in members.filter(pl.col("column") == column).group_by("method", maintain_order=True)
    }
    if reference not in runs:
        return {}, [f"no {reference} run{where}: nothing is compared"] if runs else []
    pairs, notes = {}, []
    for m in methods:
        if m == reference or m not in runs:
            continue
        a, b, unpaired = paired_values(runs[m], runs[reference], (m, reference))
        pairs[m] = a, b
        if unpaired:
            notes.append(f"{m} vs {reference}{where}: not paired: {', '.join(unpaired)}")
    p = [compare_paired(a, b).p for a, b in pairs.values()]
    tests = sum(not math.isnan(x) for x in p)
    results = {}
    for (m, (a, b)), p_holm, level in zip(pairs.items(), holm(p), holm_levels(p)):
        cmp = compare_paired(a, b, level)
        # detectable by Holm's strictest step (alpha / m): what "no detectable difference" can rule out
        mde = minimum_detectable_difference(cmp.sd, cmp.n, ALPHA / max(tests, 1))
        results[m] = {
            "comparison": cmp, "level": level, "p_holm": p_holm, "mde": mde,
            "verdict": verdict(cmp, p_holm, mde=mde, effect_of_interest=effect_of_interest / 100, scale=100),
            # the row's mean is over all its seeds, the Δ over the pairs: where they differ, show both
            "paired_means": (sum(a) / len(a), sum(b) / len(b)) if a else (math.nan, math.nan),
            "all_paired": len(a) == len(runs[m]) == len(runs[reference]),
        }
    return results, notes


def _refuse_duplicates(members: pl.DataFrame) -> None:
    """Two runs of one method and seed in one cell would be averaged as if they were seeds
    (another generator, learning rate, ... that the table does not group by): an error."""
    twice = members.group_by("method", "column", "seed").agg(pl.col("run")).filter(pl.col("run").list.len() > 1)
    if twice.height:
        r = twice.row(0, named=True)
        raise ValueError(
            f"{twice.height} (method, seed) cells hold more than one run, e.g. {r['method']} seed {r['seed']}: "
            f"{', '.join(r['run'][:2])}; they differ in a key this table does not group by: pivot it with "
            "--by KEY (e.g. --by lr), or give the leaderboard one sweep's folder"
        )


def _group_table(group: dict, members: pl.DataFrame, reference: str = BASELINE, effect_of_interest: float = EFFECT_OF_INTEREST) -> Table:
    _refuse_duplicates(members)
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
    methods = sorted(summary["method"].to_list(), key=lambda m: (m != "supervised", m != reference, m))
    cells = {(r["method"], r["column"]): r for r in per_cell.iter_rows(named=True)}
    sums = {r["method"]: r for r in summary.iter_rows(named=True)}
    compared, notes = {}, []
    for c in columns:
        compared[c], column_notes = _comparisons(members, methods, c, reference, f" in {c}" if len(columns) > 1 else "", effect_of_interest)
        notes += column_notes

    def named(title: str, c: str) -> str:
        return f"{title} {c}" if len(columns) > 1 else title

    header = ["method"] + [f"{group['eval_split']} mIoU {c}" for c in columns]
    for c in columns:
        header += [named(f"Δ vs {reference} [Holm-level CI] (pairs)", c), named("p (Holm)", c), named("MDE", c), named("verdict", c)]
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
            result = compared[c].get(m)
            if result is None:
                row += ["–"] * 4
            else:
                cmp = result["comparison"]
                row.append(_delta_cell(result))
                row.append("–" if math.isnan(result["p_holm"]) else f"{result['p_holm']:.3f}")
                row.append(_fmt(result["mde"], 100))
                row.append(result["verdict"])
                numeric_rows.append(
                    {
                        "method": m, "column": c, "reference": reference, "pairs": cmp.n, "difference": cmp.difference,
                        "paired_mean": result["paired_means"][0], "reference_paired_mean": result["paired_means"][1],
                        "ci_level": result["level"], "ci_low": cmp.low, "ci_high": cmp.high, "p": cmp.p, "p_holm": result["p_holm"],
                        "mde": result["mde"], "verdict": result["verdict"],
                    }
                )
            mean_row += [None] * 4
        for key, (_, _, scale) in SUMMARY_COLUMNS.items():
            value = sums[m][key]
            row.append(_fmt(value, scale, 1 if scale == 100 else 2 if key == "selector_ms" else 0))
            mean_row.append(value)
        rows.append(row)
        means.append(mean_row)
    directions = [None] + [True] * len(columns) + [None] * (4 * len(columns)) + [d for _, d, _ in SUMMARY_COLUMNS.values()]
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
    schema = {
        "method": pl.Utf8, "column": pl.Utf8, "reference": pl.Utf8, "pairs": pl.Int64, "difference": pl.Float64,
        "paired_mean": pl.Float64, "reference_paired_mean": pl.Float64, "ci_level": pl.Float64, "ci_low": pl.Float64,
        "ci_high": pl.Float64, "p": pl.Float64, "p_holm": pl.Float64, "mde": pl.Float64, "verdict": pl.Utf8,
    }
    numeric = per_cell.join(pl.DataFrame(numeric_rows, schema=schema), on=["method", "column"], how="left")
    numeric = numeric.join(summary, on="method", how="left").with_columns([pl.lit(str(group[k])).alias(k) for k in GROUP_KEYS])
    return Table(title, header, rows, bold, numeric, notes, members["run"].to_list())


def _delta_cell(result: dict) -> str:
    """The Δ cell, e.g. "+2.7 [-3.1, +8.4] at 97.5% (3 pairs)". Where the pairs are not all of
    either row's seeds, the row means are over other seeds than the Δ: the paired means are
    shown too ("(2 pairs: 54.5 vs 51.0)")."""
    cmp = result["comparison"]
    if not cmp.n:
        return "–"
    interval = "" if math.isnan(cmp.low) else f" [{_signed(cmp.low)}, {_signed(cmp.high)}] at {100 * result['level']:.4g}%"
    pairs = f"{cmp.n} pair" + "s" * (cmp.n != 1)
    if not result["all_paired"]:
        pairs += ": " + " vs ".join(f"{100 * x:.1f}" for x in result["paired_means"])
    return f"{_signed(cmp.difference)}{interval} ({pairs})"


def _natural(text: str):
    head = text.split(" ")[0]
    try:
        return (0, float(head), text)
    except ValueError:
        return (1, 0.0, text)


LEGEND = (
    "mIoU: mean ± std over all of the method's seeds (n). Δ: method minus {reference} in mIoU points, mean over the "
    "seeds paired with {reference} (pairs); where the pairs are fewer than either row's seeds, the mean and Δ cover "
    "different seeds and the cell adds both paired means (method vs {reference}). The interval is the t interval at "
    "1 − 0.05 / k, k the comparisons still open at the Holm step that judged it (m for the smallest p, one fewer per "
    "rejection, frozen at the first kept one), so it excludes 0 exactly when the verdict is better or worse; "
    "p (Holm): two-sided paired t-test, adjusted across the methods of the column; MDE: the true difference the "
    "seeds detect with 80% power at α = 0.05 / m (m comparisons in the column, Holm's strictest step); verdict: "
    "better / worse where the adjusted p < 0.05, else no detectable difference if the MDE is at most "
    "{effect_of_interest:g} points (the effect of interest), inconclusive (MDE) if larger."
)


def rank_across(tables: list[Table]) -> Ranking | None:
    """Methods ranked by mean mIoU within each (table, column) block; None with fewer than
    two blocks or two shared methods."""
    scores: dict[str, dict[str, float]] = {}
    for t in tables:
        for r in t.numeric.select("method", "column", "mean").iter_rows(named=True):
            scores.setdefault(f"{t.title} | {r['column']}", {})[r["method"]] = r["mean"]
    try:
        return rank_methods(scores)
    except ValueError:
        return None


def render_ranking(ranking: Ranking, fmt: str = "markdown") -> str:
    order = sorted(range(len(ranking.methods)), key=lambda i: ranking.mean_ranks[i])
    summary = (
        f"Friedman χ² = {ranking.chi2:.2f}, p = {ranking.p:.3g} (Iman–Davenport F = {ranking.iman_davenport_f:.2f}, "
        f"p = {ranking.iman_davenport_p:.3g}) over {ranking.blocks} protocols/splits; Nemenyi critical difference "
        f"{ranking.critical_difference:.2f} at α = 0.05: two methods whose mean ranks differ by more differ detectably."
    )
    if fmt == "markdown":
        lines = ["### Mean rank across protocols and splits (1 = best)", "", "| method | mean rank |", "|---|---|"]
        lines += [f"| {ranking.methods[i]} | {ranking.mean_ranks[i]:.2f} |" for i in order]
        return "\n".join(lines + ["", summary])
    if fmt == "latex":
        return "% " + summary + "\n" + "\n".join(f"% {ranking.methods[i]}: {ranking.mean_ranks[i]:.2f}" for i in order)
    items = "".join(f"<tr><td>{html.escape(ranking.methods[i])}</td><td>{ranking.mean_ranks[i]:.2f}</td></tr>" for i in order)
    return f"<h3>Mean rank</h3><table><tbody>{items}</tbody></table><p>{html.escape(summary)}</p>"


def render(
    tables: list[Table], others: pl.DataFrame, fmt: str = "markdown", reference: str = BASELINE, rank: bool = True,
    effect_of_interest: float = EFFECT_OF_INTEREST,
) -> str:
    """The tables, their legend, the ranking, and every record not in the tables with why
    (in csv: rows with run, status and error after the tables' rows)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "csv":
        frames = [t.numeric for t in tables if t.numeric is not None] + ([others] if others.height else [])
        return pl.concat(frames, how="diagonal").write_csv() if frames else ""
    parts = [_render_table(t, fmt) for t in tables]
    if not tables:
        parts.append("no tables: no complete runs to compare")
    else:
        legend = LEGEND.format(reference=reference, effect_of_interest=effect_of_interest)
        parts.append({"latex": f"% {legend}", "html": f"<p>{html.escape(legend)}</p>"}.get(fmt, legend))
    ranking = rank_across(tables) if rank else None  # blocks: protocols and splits, not values of a pivoted key
    if ranking is not None:
        parts.append(render_ranking(ranking, fmt))
    if others.height:
        listing = [f"{r['run']}: {r['status']}" + (f" ({r['error']})" if r["error"] else "") for r in others.iter_rows(named=True)]
        if fmt == "html":
            parts.append("<p>Not in the tables:</p><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in listing) + "</ul>")
        elif fmt == "latex":
            parts.append("% not in the tables:\n" + "\n".join(f"% {x}" for x in listing))
        else:
            parts.append("Not in the tables, with why:\n" + "\n".join(f"- {x}" for x in listing))
    return "\n\n".join(parts) + "\n"


def _render_table(t: Table, fmt: str) -> str:
    def cell(text: str, bold: bool) -> str:
        if fmt == "markdown":
            return f"**{text}**" if bold else text
        if fmt == "latex":
            text = text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("_", r"\_").replace("%", r"\%")
            return rf"\textbf{{{text}}}" if bold else text
        text = html.escape(text)
        return f"<b>{text}</b>" if bold else text

    body = [[cell(x, b) for x, b in zip(row, flags)] for row, flags in zip(t.rows, t.bold)]
    if fmt == "markdown":
        lines = [f"### {t.title}", "", "| " + " | ".join(t.header) + " |", "|" + "|".join("---" for _ in t.header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        lines += [""] + [f"- {note}" for note in t.notes] if t.notes else []
        return "\n".join(lines)
    if fmt == "latex":
        head = " & ".join(cell(h, False) for h in t.header)  # cell() escapes the header too
        lines = [f"% {t.title}", r"\begin{tabular}{l" + "r" * (len(t.header) - 1) + "}", r"\toprule", head + r" \\", r"\midrule"]
        lines += [" & ".join(r) + r" \\" for r in body]
        lines += [r"\bottomrule", r"\end{tabular}"] + [f"% {note}" for note in t.notes]
        return "\n".join(lines)
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in t.notes)
    return f"<h3>{html.escape(t.title)}</h3>\n<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{notes}"


def plot_differences(tables: list[Table], path: str | Path, reference: str = BASELINE, by: str | None = None) -> None:
    """Each method's paired difference to the reference (Holm-level interval) against the columns:
    with `--by iters` the gain over the budget, with splits the gain over label counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tables):
        rows = t.numeric.filter(pl.col("difference").is_not_null())
        columns = sorted(t.numeric["column"].unique().to_list(), key=_natural)
        numeric_x = all(_natural(c)[0] == 0 for c in columns)
        position = {c: (_natural(c)[1] if numeric_x else i) for i, c in enumerate(columns)}
        for (method,), sub in rows.group_by("method", maintain_order=True):
            sub = sub.sort(pl.col("column").replace_strict(position, return_dtype=pl.Float64))
            x = [position[c] for c in sub["column"].to_list()]
            y = [100 * v for v in sub["difference"].to_list()]
            low = [100 * (d - l) if l is not None and not math.isnan(l) else 0 for d, l in zip(sub["difference"].to_list(), sub["ci_low"].to_list())]
            high = [100 * (h - d) if h is not None and not math.isnan(h) else 0 for d, h in zip(sub["difference"].to_list(), sub["ci_high"].to_list())]
            ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=method)
        ax.axhline(0, color="k", lw=0.8)
        if not numeric_x:
            ax.set_xticks(range(len(columns)), columns, rotation=20, fontsize=8)
        ax.set(xlabel=by or "split", ylabel=f"mIoU minus {reference} (points, Holm-level CI)")
        ax.set_title(t.title.replace(", ", "\n", 2), fontsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def leaderboard(
    root: str | Path, fmt: str = "markdown", by: str | None = None, reference: str = BASELINE, figure: str | Path | None = None,
    differences: str | Path | None = None, effect_of_interest: float = EFFECT_OF_INTEREST,
) -> str:
    """The tables of every record under `root`; `figure`: also draw the critical-difference
    figure there (when there are two or more protocols or splits to rank across);
    `differences`: the paired differences to the reference against the columns;
    `effect_of_interest` (mIoU points): the smallest difference that matters, the largest MDE
    at which an undetected difference reads "no detectable difference", not "inconclusive"."""
    frame, others = load_rows(root, by)
    tables = build_tables(frame, reference, effect_of_interest)
    others = pl.concat([others, left_out(frame, tables)])
    if differences is not None:
        if not tables:
            raise ValueError("no complete runs to draw differences from")
        plot_differences(tables, differences, reference, by)
    if figure is not None:
        ranking = rank_across(tables) if by is None else None
        if ranking is None:
            raise ValueError("a critical-difference figure needs two or more protocols or splits with two shared methods")
        from bench.results.statistics import plot_critical_difference

        plot_critical_difference(ranking, figure)
    return render(tables, others, fmt, reference, rank=by is None, effect_of_interest=effect_of_interest)
