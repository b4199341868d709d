"""The losses of the semi-supervised step, each written once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.labels import IGNORE
from bench.contract import Selection


@dataclass
class PseudoTargets:
    """What an unlabeled view is trained against: the selector's decision plus the pixels
    that are image rather than padding."""

    label: Tensor  # (B, H, W) int64
    weight: Tensor  # (B, H, W) float
    valid: Tensor  # (B, H, W) bool
    negatives: Tensor | None = None  # (B, K, H, W) bool
    reliable: Tensor | None = None  # (B, H, W) bool: the selector's hard "selected" set

    @classmethod
    def from_selection(cls, selection: Selection, valid: Tensor) -> "PseudoTargets":
        return cls(selection.label, selection.weight, valid, selection.negatives, selection.reliable)

    def split(self, sizes: list[int]) -> list["PseudoTargets"]:
        fields = (self.label, self.weight, self.valid, self.negatives, self.reliable)
        parts = [t.split(sizes) if t is not None else [None] * len(sizes) for t in fields]
        return [PseudoTargets(*fields) for fields in zip(*parts)]

    def paste(self, source: "PseudoTargets", box: Tensor) -> "PseudoTargets":
        """CutMix: inside `box` (B, H, W) take everything from `source`, the mix batch."""
        negatives = reliable = None
        if self.negatives is not None:
            negatives = torch.where(box.unsqueeze(1), source.negatives, self.negatives)
        if self.reliable is not None:
            reliable = torch.where(box, source.reliable, self.reliable)
        return PseudoTargets(
            torch.where(box, source.label, self.label),
            torch.where(box, source.weight, self.weight),
            torch.where(box, source.valid, self.valid),
            negatives,
            reliable,
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


def logit_penalty(logits: Tensor, target: PseudoTargets, margin: float = 10.0) -> Tensor:
    """"Do not trust what you trust" (TMLR 2024): over S = reliable & valid pixels whose
    student argmax equals the pseudo-label, (1 / (|S| K)) sum_S sum_k max(0, max_j z_j - z_k
    - margin), which keeps confident logits from running away. 0 when S is empty (the
    authors' code gives NaN there)."""
    z = logits.float()
    top, arg = z.max(dim=1)
    agree = target.valid & (arg == target.label)
    if target.reliable is not None:
        agree &= target.reliable
    gap = (top.unsqueeze(1) - z - margin).clamp(min=0).sum(dim=1)
    return (gap * agree).sum() / (agree.sum() * z.shape[1]).clamp(min=1)
