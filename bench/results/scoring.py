"""Every selector scored on the same predictions: the one implementation of selection scores
outside training (bank points in a run, `select-eval` and `bank score` all come here).

Coverage, precision, recall and the AUROC of the weight are the training meter's
(`SelectionQualityMeter`), updated image by image, so a score here is what the meter of a
run would say on these images. The precision gain compares a selector with the max-confidence
threshold that admits as many pixels (interpolated within a histogram bin), with a bootstrap
interval over images.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.contract import Selection, available_selectors, build_context, get_selector
from bench.contract.metrics import SelectionQualityMeter, auroc_from_histograms
from bench.labels import IGNORE
from bench.results.predictions import Predictions

BINS = 2048
BASELINES = ("max confidence", "margin (top-1 - top-2)", "1 - normalised entropy")
COLUMNS = ("coverage", "precision", "recall", "auroc", "matched_threshold_precision", "precision_gain", "gain_ci")


def select_all(sel, preds: Predictions) -> list[Selection]:
    """`sel` on every image in order, with the context it declares."""
    out = []
    for i, p in enumerate(preds.probs):
        context = build_context(sel, preds.available(i, sel.name))
        out.append(sel.select(p[None], preds.valid(i)[None], **context))
    return out


def prepared_selector(name: str, preds: Predictions, params: dict | None = None):
    """A fresh `name` in the state it should be scored in, and where that state came from:
    "training" (the state the run's follower or own selector had at these predictions),
    "followed from iteration N" (banking began at a resume), "warm-up" (no stored state:
    one pass over these images first fills its EMAs, histories and counts), or None for a
    stateless selector (docs/banks.md says how close each is)."""
    sel = get_selector(name, num_classes=preds.num_classes, **(params or {}))
    if not sel.state_dict():
        return sel, None
    stored = preds.selector_states.get(name)
    if stored is not None and stored["params"] == sel.params():
        sel.load_state_dict(stored["state"])
        return sel, "training" if stored["since"] == 0 else f"followed from iteration {stored['since']}"
    if all(c in preds.available(0) for c in sel.required_context):
        select_all(sel, preds)
    return sel, "warm-up"


def calibration(preds: Predictions, bins: int = 15, confident: float = 0.95) -> dict:
    """How far the teacher's max confidence is from its accuracy on labelled pixels: the
    expected calibration error (equal-width bins), and how many wrong pixels look confident."""
    conf = torch.cat([p.max(0).values.flatten() for p in preds.probs]).double()
    label = torch.cat([p.argmax(0).flatten() for p in preds.probs])
    gt = torch.cat([g.flatten() for g in preds.gt])
    keep = (gt != IGNORE) & (gt < preds.num_classes)
    conf, right = conf[keep], (label == gt)[keep].double()
    n = conf.numel()
    if n == 0:
        return {"pixels": 0, "accuracy": math.nan, "ece": math.nan, "wrong_confident_share": math.nan, "confident_error_rate": math.nan}
    which = (conf * bins).long().clamp(max=bins - 1)  # [i/bins, (i+1)/bins), 1.0 in the last
    acc_sum = torch.bincount(which, weights=right, minlength=bins)
    conf_sum = torch.bincount(which, weights=conf, minlength=bins)
    ece = float((acc_sum - conf_sum).abs().sum() / n)  # sum_b n_b/n |acc_b - conf_b|
    wrong, high = right == 0, conf >= confident
    return {
        "pixels": n,
        "accuracy": float(right.mean()),
        "ece": ece,
        "wrong_confident_share": float((wrong & high).sum() / wrong.sum()) if wrong.any() else math.nan,
        "confident_error_rate": float((wrong & high).sum() / high.sum()) if high.any() else math.nan,
    }


def _histograms(scores: list[torch.Tensor], correct: list[torch.Tensor], keep: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per image, counts of all and of correct pixels in BINS bins of a score in [0, 1]."""
    n = len(scores)
    all_h, cor_h = np.zeros((n, BINS)), np.zeros((n, BINS))
    for i, (s, c, k) in enumerate(zip(scores, correct, keep)):
        b = (s[k].clamp(0, 1) * (BINS - 1)).round().long()
        all_h[i] = torch.bincount(b, minlength=BINS).numpy()
        cor_h[i] = torch.bincount(b[c[k]], minlength=BINS).numpy()
    return all_h, cor_h


def precision_at_count(all_hist: np.ndarray, cor_hist: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Precision of the k highest-scoring pixels (rows: resamples), interpolating within the
    boundary bin."""
    all_desc, cor_desc = all_hist[..., ::-1], cor_hist[..., ::-1]
    ca, cc = np.cumsum(all_desc, -1), np.cumsum(cor_desc, -1)
    idx = np.array([np.searchsorted(row, kk) for row, kk in zip(ca, k)])
    idx = np.minimum(idx, BINS - 1)
    rows = np.arange(len(k))
    before_a = np.where(idx > 0, ca[rows, idx - 1], 0)
    before_c = np.where(idx > 0, cc[rows, idx - 1], 0)
    in_bin = all_desc[rows, idx]
    frac = np.where(in_bin > 0, (k - before_a) / np.maximum(in_bin, 1), 0)
    correct = before_c + frac * cor_desc[rows, idx]
    return correct / np.maximum(k, 1)


def _ranking_auroc(name: str, scores: list[torch.Tensor], correct: list[torch.Tensor], labelled: list[torch.Tensor]) -> dict:
    """A score that ranks pixels but selects none (max confidence, margin, certainty): its
    AUROC for correctness, binned as the meter bins a weight."""
    bins = SelectionQualityMeter(2).auroc_bins
    pos = torch.zeros(bins, dtype=torch.long)
    neg = torch.zeros(bins, dtype=torch.long)
    for s, c, lab in zip(scores, correct, labelled):
        b = (s.double().clamp(0, 1) * (bins - 1)).round().long()
        pos += torch.bincount(b[c & lab], minlength=bins)
        neg += torch.bincount(b[~c & lab], minlength=bins)
    return {"name": name, "auroc": auroc_from_histograms(pos, neg)}


def score_predictions(
    preds: Predictions, names: list[str] | None = None, bootstrap: int = 1000, seed: int = 0, params: dict[str, dict] | None = None
) -> list[dict]:
    """One row per ranking baseline and per selector (default: every registered one, each
    with its defaults or `params[name]`)."""
    names = names or available_selectors()
    k = preds.num_classes
    labelled = [(g != IGNORE) & (g < k) for g in preds.gt]
    conf = [p.max(0).values for p in preds.probs]
    correct = [p.argmax(0) == g for p, g in zip(preds.probs, preds.gt)]
    all_h, cor_h = _histograms(conf, correct, labelled)
    rng = np.random.default_rng(seed)
    n = len(preds.probs)
    counts = rng.multinomial(n, [1 / n] * n, size=bootstrap).astype(float)  # (bootstrap, n) image weights
    boot_all, boot_cor = counts @ all_h, counts @ cor_h
    top2 = [p.topk(2, dim=0).values for p in preds.probs]
    certainty = [1 + (p * p.clamp(min=1e-12).log()).sum(0) / math.log(k) for p in preds.probs]
    rows = [
        _ranking_auroc(BASELINES[0], conf, correct, labelled),
        _ranking_auroc(BASELINES[1], [t[0] - t[1] for t in top2], correct, labelled),
        _ranking_auroc(BASELINES[2], certainty, correct, labelled),
    ]
    offered = set(preds.available(0)) if preds.probs else set()
    for name in names:
        sel, state = prepared_selector(name, preds, (params or {}).get(name))
        missing = [c for c in sel.required_context if c not in offered]
        if missing:  # e.g. stochastic passes a bank recorded without
            rows.append({"name": name, "skipped": f"needs {', '.join(missing)}, which these predictions do not hold"})
            continue
        selections = select_all(sel, preds)
        meter = SelectionQualityMeter(k)
        per_img_sel, per_img_hit = np.zeros(n), np.zeros(n)
        for i, (s, g, lab) in enumerate(zip(selections, preds.gt, labelled)):
            meter.update(s, g[None], valid=preds.valid(i)[None])
            chosen = s.reliable[0] & lab
            per_img_sel[i], per_img_hit[i] = float(chosen.sum()), float((chosen & (s.label[0] == g)).sum())
        q = meter.compute()
        row = {"name": name, "coverage": q["coverage"], "precision": q["precision"], "recall": q["recall"], "auroc": q["auroc"]}
        if state is not None:
            row["state"] = state
        k_total = per_img_sel.sum()
        if k_total:
            matched = precision_at_count(all_h.sum(0, keepdims=True), cor_h.sum(0, keepdims=True), np.array([k_total]))[0]
            boot_k = counts @ per_img_sel
            boot_prec = (counts @ per_img_hit) / np.maximum(boot_k, 1)
            boot_diff = boot_prec - precision_at_count(boot_all, boot_cor, boot_k)
            row["matched_threshold_precision"] = float(matched)
            row["precision_gain"] = q["precision"] - float(matched)
            row["gain_ci"] = (float(np.percentile(boot_diff, 2.5)), float(np.percentile(boot_diff, 97.5)))
        rows.append(row)
    return rows


def format_scores(rows: list[dict]) -> str:
    def pct(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    def plain(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    header = "| selector | coverage | precision | recall | threshold precision at same coverage | precision gain [95% CI] | AUROC of weight |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = r.get("precision_gain")
        ci = r.get("gain_ci")
        gain_txt = "–" if gain is None or ci is None or math.isnan(gain) else f"{100 * gain:+.2f} [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"
        name = r["name"] + (f" ({r['state']} state)" if r.get("state") not in (None, "training") else "")
        lines.append(
            f"| {name} | {pct(r.get('coverage'))} | {pct(r.get('precision'))} | {pct(r.get('recall'))} | "
            f"{pct(r.get('matched_threshold_precision'))} | {gain_txt} | {plain(r.get('auroc'))} |"
        )
    return "\n".join(lines)


def score_bank(folder, names: list[str] | None = None, bootstrap: int = 1000, seed: int = 0, params: dict[str, dict] | None = None,
               progress=None) -> list[dict]:
    """Every point of the bank in `folder` scored: one row per (point, selector or baseline),
    with the point's iteration and progress. `progress(i, n)` is told each finished point."""
    from bench.results.bank import load_point, load_truth, read_manifest

    manifest = read_manifest(folder)
    if not manifest.points:
        raise ValueError(f"{folder}: the bank holds no points yet")
    truth = load_truth(folder, manifest)
    rows = []
    for i, entry in enumerate(manifest.points):
        preds = load_point(folder, manifest, entry, truth)
        for row in score_predictions(preds, names, bootstrap, seed + entry.iteration, params):
            rows.append({"iteration": entry.iteration, "progress": entry.progress, **row})
        if progress is not None:
            progress(i + 1, len(manifest.points))
    return rows


def write_scores(rows: list[dict], out) -> list[str]:
    """scores.json (everything), scores.csv (one row per point and selector) and a markdown
    table per point; the names of the files written."""
    import csv
    import io
    import json
    from pathlib import Path

    from bench.files import atomic_write_text, json_safe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scores.json", json.dumps(json_safe(rows), indent=1))
    fields = ["iteration", "progress", "name", "state", "coverage", "precision", "recall", "auroc", "matched_threshold_precision", "precision_gain", "gain_low", "gain_high"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        ci = r.get("gain_ci") or (None, None)
        writer.writerow({**r, "gain_low": ci[0], "gain_high": ci[1]})
    atomic_write_text(out / "scores.csv", text.getvalue())
    tables = []
    for iteration in sorted({r["iteration"] for r in rows}):
        at = [r for r in rows if r["iteration"] == iteration]
        tables.append(f"### iteration {iteration} (progress {at[0]['progress']:.2f})\n\n{format_scores(at)}\n")
    atomic_write_text(out / "scores.md", "\n".join(tables))
    return ["scores.json", "scores.csv", "scores.md"]
