"""CoVar: Confidence-Variance selection (arXiv 2601.11670).

CSL's machinery with the variance feature scaled by g(C) (`features="cgv"`, g_alpha = 1)
and the reliable cluster picked by mu_C - lam mu_gV (`pick="linear"`, lam = 0.25).
"""

from __future__ import annotations

from csl.selector import ConfidenceSeparable


class ConfidenceVariance(ConfidenceSeparable):
    def __init__(
        self,
        num_classes: int,
        features: str = "cgv",
        variance: str = "author",
        pick: str = "linear",
        lam: float = 0.25,
        alpha: float = 2.0,
        eps: float = 1e-8,
        g_alpha: float = 1.0,
    ):
        super().__init__(num_classes, features, variance, pick, lam, alpha, eps, g_alpha)
