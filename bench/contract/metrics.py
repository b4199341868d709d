"""Dataset-level meters: counts are summed per batch (`update`) and divided once (`compute`).

Averaging per-batch ratios would weight a batch with ten labelled pixels like one with a
million; summing first gives the numbers a reader expects.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bench.labels import IGNORE
from bench.contract.selection import Selection


def _labelled(gt: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    return (gt != ignore_index) & (gt >= 0) & (gt < num_classes)


def _safe_div(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def iou_from_confusion(confusion: Tensor) -> Tensor:
    """Per-class IoU (float64) from a K x K confusion matrix (rows truth, columns
    prediction); NaN for a class that appears in neither."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def nanmean(values: Tensor) -> float:
    present = values[~torch.isnan(values)]
    return float(present.mean()) if present.numel() else math.nan


class IoUMeter:
    """Confusion matrix over a dataset; mIoU is the nanmean of per-class IoU."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE):
        if num_classes < 2:
            raise ValueError(f"IoUMeter: num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, pred: Tensor, gt: Tensor) -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"IoUMeter: pred shape {tuple(pred.shape)} != gt shape {tuple(gt.shape)}")
        keep = _labelled(gt, self.num_classes, self.ignore_index)
        pred = pred.clamp(0, self.num_classes - 1)
        index = torch.where(keep, gt * self.num_classes + pred, self.num_classes**2)
        counts = torch.bincount(index.flatten(), minlength=self.num_classes**2 + 1)
        self.confusion += counts[:-1].view(self.num_classes, self.num_classes).cpu()

    def compute(self) -> dict:
        iou = iou_from_confusion(self.confusion)
        total = int(self.confusion.sum())
        return {
            "miou": nanmean(iou),
            "per_class_iou": iou.tolist(),
            "pixel_accuracy": _safe_div(float(self.confusion.diagonal().sum()), total),
            "pixels": total,
        }


class SelectionQualityMeter:
    """What a selector selects, judged against the hidden ground truth of unlabeled pixels.

    Over pixels with a ground-truth label (and inside `valid` when given): correct means
    label == gt. coverage = |selected| / |labelled|, precision = |selected & correct| /
    |selected|, recall = |selected & correct| / |correct|, weighted precision =
    sum(w correct) / sum(w), F1 of precision and recall, AUROC of the weight for
    correctness, pseudo-label mIoU over the selected pixels, and per ground-truth class
    the fraction of its pixels selected. The AUROC is computed from weight histograms
    with `auroc_bins` bins on [0, 1] (ties within a bin count half): exact for hard
    selectors, within about 1/auroc_bins for soft ones.
    """

    def __init__(self, num_classes: int, auroc_bins: int = 4096, device: torch.device | str = "cpu"):
        if num_classes < 2:
            raise ValueError(f"SelectionQualityMeter: num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.auroc_bins = auroc_bins
        self.device = torch.device(device)  # where the counts live: update() never reads them on the host
        self.reset()

    def reset(self) -> None:
        k = self.num_classes

        def zeros(*size, dtype=torch.int64):
            return torch.zeros(size, dtype=dtype, device=self.device)

        self.counts = zeros(4, dtype=torch.float64)  # labelled, selected, correct, sel&correct
        self.weight_sums = zeros(2, dtype=torch.float64)  # sum w, sum w*correct
        self.class_labelled = zeros(k)
        self.class_selected = zeros(k)
        self.confusion = zeros(k, k)  # selected pixels only
        self.hist = zeros(2, self.auroc_bins)  # incorrect, correct

    _STATE = ("counts", "weight_sums", "class_labelled", "class_selected", "confusion", "hist")

    def state_dict(self) -> dict[str, Tensor]:
        """The counts, on the CPU (a checkpoint's or a log step's copy)."""
        return {k: getattr(self, k).cpu().clone() for k in self._STATE}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in self._STATE:
            if tuple(state[k].shape) != tuple(getattr(self, k).shape):
                raise ValueError(f"SelectionQualityMeter: state '{k}' has shape {tuple(state[k].shape)}, expected {tuple(getattr(self, k).shape)}")
            setattr(self, k, state[k].to(self.device, copy=True))

    def since(self, earlier: dict[str, Tensor]) -> dict:
        """compute() over only what was added after `earlier` (a state_dict of this meter):
        interval statistics without a second meter updated on every batch."""
        delta = SelectionQualityMeter(self.num_classes, self.auroc_bins)
        now = self.state_dict()
        delta.load_state_dict({k: now[k] - earlier[k] for k in self._STATE})
        return delta.compute()

    def update(self, selection: Selection, gt: Tensor, ignore_index: int = IGNORE, valid: Tensor | None = None) -> None:
        if gt.shape != selection.label.shape:
            raise ValueError(
                f"SelectionQualityMeter: gt shape {tuple(gt.shape)} != selection shape "
                f"{tuple(selection.label.shape)}"
            )
        k = self.num_classes
        labelled = _labelled(gt, k, ignore_index)
        if valid is not None:
            labelled &= valid
        correct = (selection.label == gt) & labelled
        selected = selection.reliable & labelled
        w = selection.weight.double() * labelled
        self.counts += torch.stack([labelled.sum(), selected.sum(), correct.sum(), (selected & correct).sum()]).double()
        self.weight_sums += torch.stack([w.sum(), (w * correct).sum()])

        self.class_labelled += _count(torch.where(labelled, gt, k), k)
        self.class_selected += _count(torch.where(selected, gt, k), k)
        pair = torch.where(selected, gt * k + selection.label.clamp(0, k - 1), k * k)
        self.confusion += _count(pair, k * k).view(k, k)

        nb = self.auroc_bins
        bins = (selection.weight.double().nan_to_num(0.0).clamp(0, 1) * (nb - 1)).round().long()  # NaN: a diverged step, reported by the checks
        slot = torch.where(labelled, correct.long() * nb + bins, 2 * nb)
        self.hist += _count(slot, 2 * nb).view(2, nb)

    def compute(self) -> dict:
        s = self.state_dict()  # on the CPU, wherever the counts live
        n_lab, n_sel, n_cor, n_sel_cor = s["counts"].tolist()
        sum_w, sum_w_cor = s["weight_sums"].tolist()
        precision = _safe_div(n_sel_cor, n_sel)
        recall = _safe_div(n_sel_cor, n_cor)
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision + recall > 0
            else (0.0 if n_sel > 0 and n_cor > 0 else math.nan)
        )
        per_class = torch.where(
            s["class_labelled"] > 0,
            s["class_selected"].double() / s["class_labelled"].clamp(min=1),
            torch.full((self.num_classes,), math.nan, dtype=torch.float64),
        )
        return {
            "coverage": _safe_div(n_sel, n_lab),
            "precision": precision,
            "recall": recall,
            "weighted_precision": _safe_div(sum_w_cor, sum_w),
            "f1": f1,
            "auroc": auroc_from_histograms(s["hist"][1], s["hist"][0]),
            "pseudo_miou": nanmean(iou_from_confusion(s["confusion"])),
            "label_accuracy": _safe_div(n_cor, n_lab),
            "per_class_coverage": per_class.tolist(),
            "pixels": int(n_lab),
        }


def _count(index: Tensor, n: int) -> Tensor:
    """How often each of 0..n-1 occurs in `index` (values >= n are dropped). Unlike
    bincount, whose output size comes from max(index) read on the host on a GPU, the size
    here is fixed, so counting never waits for the device."""
    counts = torch.zeros(n + 1, dtype=torch.int64, device=index.device)
    flat = index.flatten().clamp(0, n)
    counts.index_add_(0, flat, counts.new_ones(()).expand(flat.numel()))
    return counts[:n]


def auroc_from_histograms(positive: Tensor, negative: Tensor) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(same bin), from bin counts
    ordered by increasing score."""
    pos, neg = positive.double(), negative.double()
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = torch.cumsum(neg, 0) - neg  # negatives in strictly lower bins
    wins = (pos * (neg_below + 0.5 * neg)).sum()
    return float(wins) / (n_pos * n_neg)
