"""A model's predictions on unlabelled images, and the figures people look at.

`predict` runs a model once over unlabelled images (whole images, in eval mode): the
softmax, the stochastic passes selectors declare and a labelled batch. Scoring them is
bench/results/scoring.py; keeping them is a prediction bank (bench/results/bank.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.contract import available_selectors, get_selector
from bench.harness.frameworks import mc_logits
from bench.harness.runs import LoadedRun
from bench.labels import IGNORE
from bench.results.figures import pyplot as _plt
from bench.results.predictions import Predictions
from bench.results.scoring import prepared_selector, select_all


def mc_passes_declared(num_classes: int) -> int:
    """The most stochastic passes any registered selector asks for."""
    return max(get_selector(n, num_classes=num_classes).mc_passes for n in available_selectors())


@torch.no_grad()
def collect_predictions(run: LoadedRun, limit: int = 100, mc_passes: int | None = None) -> Predictions:
    """The run's model (its EMA teacher where it had one) on up to `limit` unlabeled images
    (whole image): the softmax, as many stochastic passes as any registered selector
    declares (`mc_passes`), and a labelled batch for selectors that read one."""
    return predict(run.model.eval(), run.source, run.split, run.device, limit, mc_passes)


@torch.no_grad()
def predict(model, source, split, device, limit: int = 100, mc_passes: int | None = None, progress: float = 1.0) -> Predictions:
    """`model` (in eval mode) on up to `limit` of the split's unlabeled images."""
    from bench.data.loaders import EvalSet

    if mc_passes is None:
        mc_passes = mc_passes_declared(source.num_classes)
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
    return Predictions(probs, gts, mcs or None, labeled, source.num_classes, progress)


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
        outs = select_all(prepared_selector(name, preds)[0], preds)
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
