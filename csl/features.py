"""CSL's two-feature description of each pixel's confidence distribution.

C is the max confidence; V the variance of the residual classes. With m = (1 - C)/(K - 1)
and R = P with its argmax slot set to 0, the authors' code computes
V = (1/(K-1)) * sum over all K slots of (R_k - m)^2, which counts the zeroed slot and so
equals the true residual variance plus m^2/(K-1) (`variance="author"`); `"exact"` sums over
the K-1 residual classes only. Both follow from the class moments without another read of
the probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bench.contract.confidence import ClassMoments

FEATURES = ("cv", "cgv", "logc_neg_gv")
VARIANCES = ("author", "exact")


def residual_variance(moments: ClassMoments, num_classes: int, variance: str = "author") -> Tensor:
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    k1 = num_classes - 1
    conf = moments.confidence
    if variance == "exact" and num_classes == 2:
        return torch.zeros_like(conf)  # one residual class: no spread, exactly
    m = (1.0 - conf) / k1
    slots = num_classes if variance == "author" else k1
    # sum_slots (R_k - m)^2 = sum R^2 - 2 m sum R + slots m^2
    spread = moments.residual_sq - 2.0 * m * moments.residual_sum + slots * m.square()
    return (spread / k1).clamp_(min=0.0)


def confidence_features(
    moments: ClassMoments,
    num_classes: int,
    features: str = "cv",
    variance: str = "author",
    g_alpha: float = 1.0,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """The feature pair (f1, f2) CSL separates: (C, V), (C, g(C) V) or (log C, -g(C) V),
    with g(C) = g_alpha (K-1)^2 / (2 (1 - C + eps)) scaling V up where C is high."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    conf = moments.confidence
    var = residual_variance(moments, num_classes, variance)
    if features == "cv":
        return conf, var
    g = g_alpha * (num_classes - 1) ** 2 / (2.0 * (1.0 - conf + eps))
    if features == "cgv":
        return conf, g * var
    return torch.log(conf), -(g * var)
