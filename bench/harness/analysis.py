"""Selection without retraining, and the figures people look at.

`select_eval` runs a trained model once over unlabeled images and scores every registered
selector on the identical predictions. A selector that admits more pixels always looks
less precise, so the key column compares like with like: the selector's precision minus
the precision of a global max-confidence threshold admitting the same number of pixels,
with a 95% bootstrap interval over images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.harness.frameworks import mc_logits
from bench.labels import IGNORE
from bench.contract.metrics import auroc_from_histograms
from bench.harness.runs import LoadedRun
from bench.results.figures import pyplot as _plt
from bench.contract import Selection, available_selectors, build_context, get_selector

BINS = 2048


@dataclass
class Predictions:
    probs: list[torch.Tensor]  # per image (K, H, W)
    gt: list[torch.Tensor]  # per image (H, W), IGNORE = void
    mc_logits: list[torch.Tensor] | None  # per image (T, K, H, W)
    labeled: tuple[torch.Tensor, torch.Tensor] | None  # labelled probs (B, K, H, W), targets
    num_classes: int


@torch.no_grad()
def collect_predictions(run: LoadedRun, limit: int = 100, mc_passes: int | None = None) -> Predictions:
    """The run's model (its EMA teacher where it had one) on up to `limit` unlabeled images
    (whole image): the softmax, as many stochastic passes as any registered selector
    declares (`mc_passes`), and a labelled batch for selectors that read one."""
    return predict(run.model.eval(), run.source, run.split, run.device, limit, mc_passes)


@torch.no_grad()
def predict(model, source, split, device, limit: int = 100, mc_passes: int | None = None) -> Predictions:
    """`model` (in eval mode) on up to `limit` of the split's unlabeled images."""
    from bench.data.loaders import EvalSet

    if mc_passes is None:
        mc_passes = max(get_selector(n, num_classes=source.num_classes).mc_passes for n in available_selectors())
    probs, gts, mcs = [], [], []
    unl = EvalSet(source, split.unlabeled[:limit], model.normalization)
    for i in range(len(unl)):
        item = unl[i]
        x = item["image"][None].to(device)
        probs.append(model(x).float().softmax(1)[0].cpu())
        if mc_passes:
            mcs.append(mc_logits(model, x, mc_passes)[:, 0].cpu())
        gts.append(item["mask"])
    lab = EvalSet(source, split.labeled[:8], model.normalization)
    items = [lab[i] for i in range(len(lab))]
    same = len({tuple(it["image"].shape) for it in items}) == 1
    labeled = None
    if same:
        x = torch.stack([it["image"] for it in items]).to(device)
        labeled = (model(x).float().softmax(1).cpu(), torch.stack([it["mask"] for it in items]))
    return Predictions(probs, gts, mcs or None, labeled, source.num_classes)


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
    count = torch.bincount(which, minlength=bins).double()
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


def _select_all(sel, preds: Predictions) -> list[Selection]:
    out = []
    for i, p in enumerate(preds.probs):
        valid = torch.ones(p.shape[1:], dtype=torch.bool)[None]
        available = {}  # no progress: schedules (U2PL) sit at their start, the strictest point
        if preds.mc_logits is not None:
            available["mc_logits"] = lambda passes, i=i: _passes(preds, i, passes, sel.name)
        if preds.labeled is not None:
            available["labeled_probs"], available["labeled_target"] = preds.labeled
        out.append(sel.select(p[None], valid, **build_context(sel, available)))
    return out


def _passes(preds: Predictions, i: int, passes: int, name: str) -> torch.Tensor:
    have = preds.mc_logits[i].shape[0]
    if passes > have:
        raise ValueError(f"selector '{name}' asks for {passes} stochastic passes but only {have} were collected (collect_predictions(mc_passes=...))")
    return preds.mc_logits[i][:passes, None]


def _histograms(scores: list[torch.Tensor], correct: list[torch.Tensor], keep: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per image, counts of all and of correct pixels in BINS bins of a score in [0, 1]."""
    n = len(scores)
    all_h, cor_h = np.zeros((n, BINS)), np.zeros((n, BINS))
    for i, (s, c, k) in enumerate(zip(scores, correct, keep)):
        b = (s[k].clamp(0, 1) * (BINS - 1)).round().long()
        all_h[i] = torch.bincount(b, minlength=BINS).numpy()
        cor_h[i] = torch.bincount(b[c[k]], minlength=BINS).numpy()
    return all_h, cor_h


def _precision_at_count(all_hist: np.ndarray, cor_hist: np.ndarray, k: np.ndarray) -> np.ndarray:
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


def select_eval(preds: Predictions, names: list[str] | None = None, bootstrap: int = 1000, seed: int = 0) -> list[dict]:
    names = names or available_selectors()
    labelled = [(g != IGNORE) & (g < preds.num_classes) for g in preds.gt]
    conf = [p.max(0).values for p in preds.probs]
    label = [p.argmax(0) for p in preds.probs]
    correct = [(l == g) for l, g in zip(label, preds.gt)]
    all_h, cor_h = _histograms(conf, correct, labelled)
    rng = np.random.default_rng(seed)
    n = len(preds.probs)
    counts = rng.multinomial(n, [1 / n] * n, size=bootstrap).astype(float)  # (B, n)
    boot_all, boot_cor = counts @ all_h, counts @ cor_h
    top2 = [p.topk(2, dim=0).values for p in preds.probs]
    margin = [t[0] - t[1] for t in top2]
    certainty = [1 + (p * p.clamp(min=1e-12).log()).sum(0) / math.log(preds.num_classes) for p in preds.probs]
    rows = [
        _score_row("max confidence", conf, correct, labelled),
        _score_row("margin (top-1 - top-2)", margin, correct, labelled),
        _score_row("1 - normalised entropy", certainty, correct, labelled),
    ]
    for name in names:
        sel = get_selector(name, num_classes=preds.num_classes)
        _select_all(sel, preds)  # first pass warms stateful selectors (EMAs, histories)
        selections = _select_all(sel, preds)
        # judged on its own labels (UPS labels from its passes, not the plain argmax)
        own_correct = [s.label[0] == g for s, g in zip(selections, preds.gt)]
        sel_mask = [s.reliable[0] & k for s, k in zip(selections, labelled)]
        per_img_sel = np.array([float(m.sum()) for m in sel_mask])
        per_img_hit = np.array([float((m & c).sum()) for m, c in zip(sel_mask, own_correct)])
        k_total = per_img_sel.sum()
        row = _score_row(name, [s.weight[0] for s in selections], own_correct, labelled)
        row["coverage"] = k_total / max(sum(float(k.sum()) for k in labelled), 1)
        row["precision"] = per_img_hit.sum() / k_total if k_total else math.nan
        row["recall"] = per_img_hit.sum() / max(sum(float((c & k).sum()) for c, k in zip(own_correct, labelled)), 1)
        if k_total:
            matched = _precision_at_count(all_h.sum(0, keepdims=True), cor_h.sum(0, keepdims=True), np.array([k_total]))[0]
            boot_k = counts @ per_img_sel
            boot_prec = (counts @ per_img_hit) / np.maximum(boot_k, 1)
            boot_diff = boot_prec - _precision_at_count(boot_all, boot_cor, boot_k)
            row["matched_threshold_precision"] = matched
            row["precision_gain"] = row["precision"] - matched
            row["gain_ci"] = (float(np.percentile(boot_diff, 2.5)), float(np.percentile(boot_diff, 97.5)))
        rows.append(row)
    return rows


def _score_row(name, scores, correct, labelled) -> dict:
    pos = torch.zeros(BINS, dtype=torch.long)
    neg = torch.zeros(BINS, dtype=torch.long)
    for s, c, k in zip(scores, correct, labelled):
        b = (s.clamp(0, 1) * (BINS - 1)).round().long()
        pos += torch.bincount(b[c & k], minlength=BINS)
        neg += torch.bincount(b[~c & k], minlength=BINS)
    return {"name": name, "auroc": auroc_from_histograms(pos, neg)}


def format_select_eval(rows: list[dict]) -> str:
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
        lines.append(
            f"| {r['name']} | {pct(r.get('coverage'))} | {pct(r.get('precision'))} | {pct(r.get('recall'))} | "
            f"{pct(r.get('matched_threshold_precision'))} | {gain_txt} | {plain(r.get('auroc'))} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def plot_confidence_overlap(preds: Predictions, path: Path) -> None:
    plt = _plt()
    conf = torch.cat([p.max(0).values.flatten() for p in preds.probs])
    label = torch.cat([p.argmax(0).flatten() for p in preds.probs])
    gt = torch.cat([g.flatten() for g in preds.gt])
    keep = gt != IGNORE
    right = conf[keep & (label == gt)].numpy()
    wrong = conf[keep & (label != gt)].numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 51)
    ax.hist(right, bins=bins, alpha=0.6, density=True, label=f"correct ({len(right)} px)")
    ax.hist(wrong, bins=bins, alpha=0.6, density=True, label=f"incorrect ({len(wrong)} px)")
    ax.axvline(0.95, color="k", ls="--", lw=1, label="fixed threshold 0.95")
    ax.set(xlabel="max confidence C", ylabel="density", title="Confidence of correct vs incorrect pseudo-labels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cv_plane(preds: Predictions, path: Path, image: int = 0) -> None:
    from bench.contract.confidence import class_moments
    from csl.features import residual_variance

    plt = _plt()
    p = preds.probs[image][None]
    moments = class_moments(p)
    c = moments.confidence.flatten().numpy()
    v = residual_variance(moments, preds.num_classes).flatten().numpy()
    gt = preds.gt[image].flatten()
    ok = (moments.label.flatten() == gt).numpy()
    keep = (gt != IGNORE).numpy()
    w = get_selector("csl", num_classes=preds.num_classes).select(p, torch.ones(p.shape[0], *p.shape[2:], dtype=torch.bool)).weight.flatten().numpy()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(c[keep & ok], v[keep & ok], s=3, alpha=0.4, label="correct")
    ax.scatter(c[keep & ~ok], v[keep & ~ok], s=3, alpha=0.6, label="incorrect")
    rel = keep & (w == 1)
    ax.scatter(c[rel], v[rel], s=12, facecolors="none", edgecolors="k", linewidths=0.3, label="CSL reliable (w = 1)")
    ax.set(xlabel="max confidence C", ylabel="residual variance V", title=f"(C, V) plane, image {image}")
    ax.legend(markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_precision_coverage(preds: Predictions, path: Path, names: list[str] | None = None) -> None:
    """Each selector's weight as a ranking score (ties broken by C): precision of the
    top-scored pixels against the fraction admitted; dots mark each selector's own set."""
    plt = _plt()
    names = names or available_selectors()
    labelled = torch.cat([((g != IGNORE) & (g < preds.num_classes)).flatten() for g in preds.gt])
    conf = torch.cat([p.max(0).values.flatten() for p in preds.probs])
    correct = torch.cat([(p.argmax(0) == g).flatten() for p, g in zip(preds.probs, preds.gt)])[labelled]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))

    def curve(score, label, **kw):
        order = torch.argsort(score[labelled] + 1e-3 * conf[labelled], descending=True)
        hits = torch.cumsum(correct[order].double(), 0)
        n = torch.arange(1, len(order) + 1, dtype=torch.float64)
        step = max(1, len(order) // 400)
        ax.plot((n / len(order))[::step], (hits / n)[::step], label=label, **kw)

    curve(conf, "max confidence", color="k", lw=2)
    colours = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        sel = get_selector(name, num_classes=preds.num_classes)
        _select_all(sel, preds)
        outs = _select_all(sel, preds)
        weight = torch.cat([o.weight.flatten() for o in outs])
        reliable = torch.cat([o.reliable.flatten() for o in outs])[labelled]
        own_correct = torch.cat([(o.label[0] == g).flatten() for o, g in zip(outs, preds.gt)])[labelled]
        colour = colours[(2 * i) % 20 + (2 * i) // 20]
        soft = weight.unique().numel() > 2
        if soft:
            curve(weight, name, color=colour, lw=1)
        if reliable.any():
            ax.scatter([reliable.float().mean()], [own_correct[reliable].float().mean()], color=colour, label=None if soft else name, zorder=3)
    ax.set(xlabel="coverage (fraction of labelled pixels admitted)", ylabel="precision", title="Precision vs coverage on the same predictions")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
