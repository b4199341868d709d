"""The CSL selector: a per-image boundary in confidence space, Gaussian weights beyond it.

Each image's valid pixels are split in two by a spectral relaxation on their (C, V)
features (csl/split.py); the cluster with the larger mean confidence (or another `pick`
rule) is the reliable one; pixels more confident or less spread than its mean get weight
1, the rest exp(-z_c^2/alpha) exp(-z_v^2/alpha). Nothing is hard-dropped.
"""

from __future__ import annotations

from bench.contract.compiled import maybe_compiled
from bench.contract import Selection, Selector
from csl.features import FEATURES, VARIANCES, confidence_features
from csl.split import PICKS, cluster_stats, gaussian_weights, reliable_cluster, spectral_split


class ConfidenceSeparable(Selector):
    def __init__(
        self,
        num_classes: int,
        features: str = "cv",
        variance: str = "author",
        pick: str = "confidence",
        lam: float = 0.25,
        alpha: float = 2.0,
        eps: float = 1e-8,
        g_alpha: float = 1.0,
    ):
        super().__init__(num_classes)
        for option, value, choices in (
            ("features", features, FEATURES),
            ("variance", variance, VARIANCES),
            ("pick", pick, PICKS),
        ):
            if value not in choices:
                raise self._error(f"{option} must be one of {list(choices)}, got {value!r}")
        if pick == "neglog" and features == "logc_neg_gv":
            raise self._error(
                "pick='neglog' takes log of the second feature's mean, which is negative for "
                "features='logc_neg_gv'; use features='cv' or 'cgv', or another pick"
            )
        if alpha <= 0:
            raise self._error(f"alpha must be > 0, got {alpha}")
        if eps <= 0:
            raise self._error(f"eps must be > 0, got {eps}")
        self.features, self.variance, self.pick = features, variance, pick
        self.lam, self.alpha, self.eps, self.g_alpha = float(lam), float(alpha), float(eps), float(g_alpha)

    def _select(self, probs, valid, moments, **context):
        options = (self.num_classes, self.features, self.variance, self.pick, self.lam, self.alpha, self.eps, self.g_alpha)
        weight = csl_weight.for_input(probs)(moments, valid, *options)
        return Selection(label=moments.label, weight=weight, reliable=weight == 1.0)


@maybe_compiled
def csl_weight(moments, valid, num_classes, features, variance, pick, lam, alpha, eps, g_alpha):
    """CSL's weight map (B, H, W) from the class moments: features, per-image split,
    reliable cluster, Gaussian weights. Pure tensor code, so it compiles into a few passes."""
    f1, f2 = confidence_features(moments, num_classes, features, variance, g_alpha, eps)
    flat_valid = valid.flatten(1)
    x1 = f1.flatten(1).masked_fill(~flat_valid, 0.0)
    x2 = f2.flatten(1).masked_fill(~flat_valid, 0.0)
    second = spectral_split(x1, x2)
    stats = cluster_stats(x1, x2, flat_valid, second)
    r = reliable_cluster(stats, pick, lam, eps)
    index = r.view(-1, 1, 1).expand(-1, 1, 2)
    mean = stats.mean.gather(1, index).squeeze(1)  # (B, 2 features)
    var = stats.var.gather(1, index).squeeze(1)
    weight = gaussian_weights(x1, x2, flat_valid, mean, var, alpha, eps)
    return weight.view_as(moments.confidence)
