"""A synthetic field of class probabilities with known ground truth, for comparing
selectors without training a model.

Ground truth is a blobby segmentation with imbalanced classes and ignore pixels on some
boundaries. The "network" sees the truth through spatially smooth noise whose strength
varies per image, and is then sharpened (temperature < 1): its errors come in confident
patches, so right and wrong predictions overlap at high confidence, as they do for a real
overconfident network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.labels import IGNORE



@dataclass(frozen=True)
class PredictionField:
    logits: Tensor  # (B, K, H, W)
    probs: Tensor  # (B, K, H, W)
    gt: Tensor  # (B, H, W) int64, IGNORE on some boundaries
    valid: Tensor  # (B, H, W) bool


def _smooth_noise(shape, cells: int, size: int, generator: torch.Generator) -> Tensor:
    b, k = shape
    coarse = torch.randn(b, k, cells, cells, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def prediction_field(
    batch: int = 8,
    num_classes: int = 8,
    size: int = 96,
    seed: int = 0,
    signal: float = 1.6,
    temperature: float = 0.35,
    mc_passes: int = 0,
) -> tuple[PredictionField, Tensor | None]:
    """A batch of synthetic predictions; with mc_passes > 0 also (T, B, K, H, W) logits of
    stochastic passes (the prediction plus pass-specific smooth noise)."""
    g = torch.Generator().manual_seed(seed)
    k = num_classes
    prior = torch.linspace(1.0, -1.0, k).view(1, k, 1, 1)  # imbalance: class 0 common
    layout = _smooth_noise((batch, k), 6, size, g) * 1.5 + prior
    gt = layout.argmax(dim=1)
    # Ignore a thin band where the two leading classes nearly tie (ambiguous boundaries).
    top2 = layout.topk(2, dim=1).values
    boundary = (top2[:, 0] - top2[:, 1]) < 0.04
    difficulty = 0.5 + torch.rand(batch, 1, 1, 1, generator=g)  # per-image noise strength
    noise = _smooth_noise((batch, k), 12, size, g) * difficulty + 0.3 * torch.randn(batch, k, size, size, generator=g)
    clean = F.one_hot(gt, k).permute(0, 3, 1, 2).float() * signal
    logits = (clean + noise) / temperature
    mc = None
    if mc_passes:
        mc = torch.stack(
            [logits + _smooth_noise((batch, k), 12, size, g) * 0.35 / temperature for _ in range(mc_passes)]
        )
    gt = gt.masked_fill(boundary, IGNORE)
    valid = torch.ones(batch, size, size, dtype=torch.bool)
    return PredictionField(logits=logits, probs=logits.softmax(dim=1), gt=gt, valid=valid), mc
