"""The losses of the semi-supervised step, each written once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.labels import IGNORE
from bench.selection import Selection


@dataclass
class PseudoTargets:
    """What an unlabeled view is trained against: the selector's decision plus the pixels
    that are image rather than padding."""

    label: Tensor  # (B, H, W) int64
    weight: Tensor  # (B, H, W) float
    valid: Tensor  # (B, H, W) bool
    negatives: Tensor | None = None  # (B, K, H, W) bool

    @classmethod
    def from_selection(cls, selection: Selection, valid: Tensor) -> "PseudoTargets":
        return cls(selection.label, selection.weight, valid, selection.negatives)

    def split(self, sizes: list[int]) -> list["PseudoTargets"]:
        parts = [t.split(sizes) if t is not None else [None] * len(sizes) for t in (self.label, self.weight, self.valid, self.negatives)]
        return [PseudoTargets(*fields) for fields in zip(*parts)]

    def paste(self, source: "PseudoTargets", box: Tensor) -> "PseudoTargets":
        """CutMix: inside `box` (B, H, W) take everything from `source`, the mix batch."""
        negatives = None
        if self.negatives is not None:
            negatives = torch.where(box.unsqueeze(1), source.negatives, self.negatives)
        return PseudoTargets(
            torch.where(box, source.label, self.label),
            torch.where(box, source.weight, self.weight),
            torch.where(box, source.valid, self.valid),
            negatives,
        )


def supervised_loss(logits: Tensor, mask: Tensor, ignore_index: int = IGNORE) -> Tensor:
    return F.cross_entropy(logits.float(), mask, ignore_index=ignore_index)


def pseudo_label_loss(logits: Tensor, target: PseudoTargets, normaliser: str = "valid") -> Tensor:
    """sum(w * CE) over pixels, divided by the valid pixel count ('valid', the UniMatch/CSL
    convention) or by sum(w) ('selected'). Adds UPS's negative-learning loss when the
    selector gave negative labels."""
    logits = logits.float()
    weight = target.weight * target.valid
    ce = F.cross_entropy(logits, target.label, reduction="none")
    denom = target.valid.sum() if normaliser == "valid" else weight.sum()
    loss = (ce * weight).sum() / denom.clamp(min=1e-6)
    if target.negatives is not None:
        loss = loss + negative_learning_loss(logits, target.negatives & target.valid.unsqueeze(1))
    return loss


def negative_learning_loss(logits: Tensor, negatives: Tensor) -> Tensor:
    """UPS: -sum_k s_k log(1 - p_k) / sum_k s_k over the negative labels s."""
    probs = logits.softmax(dim=1)
    s = negatives.float()
    return -(s * torch.log((1 - probs).clamp(min=1e-6))).sum() / s.sum().clamp(min=1.0)
