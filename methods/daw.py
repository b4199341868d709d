"""DAW: distribution-aware weighting threshold (NeurIPS 2023).

Two Gaussians, fitted by EMA to the max confidence of the labeled batch's correct and
incorrect predictions (never to unlabeled ground truth), meet at tau; unlabeled pixels
with C >= tau are kept. The first statistics seen initialise each Gaussian (no pull
towards an arbitrary start); until both exist tau keeps its start value 0.95. Of the two
crossing points the one between the means is used (the midpoint when the variances are
equal, the crossing nearest the midpoint otherwise), clipped to [1/K, 1].
"""

from __future__ import annotations

import math

import torch

from bench.confidence import class_moments
from bench.labels import IGNORE
from bench.selection import Selector, hard_selection, register_selector


def gaussian_crossing(mu_a: float, var_a: float, mu_b: float, var_b: float) -> float:
    """Where the densities N(mu_a, var_a) and N(mu_b, var_b) are equal, between the means."""
    midpoint = 0.5 * (mu_a + mu_b)
    var_a, var_b = max(var_a, 1e-12), max(var_b, 1e-12)
    # (x-mu_a)^2/(2 var_a) - (x-mu_b)^2/(2 var_b) + 0.5 log(var_a/var_b) = 0
    qa = 0.5 / var_a - 0.5 / var_b
    qb = mu_b / var_b - mu_a / var_a
    qc = 0.5 * mu_a**2 / var_a - 0.5 * mu_b**2 / var_b + 0.5 * math.log(var_a / var_b)
    if abs(qa) < 1e-12 * (abs(qb) + abs(qc) + 1e-30):
        return -qc / qb if abs(qb) > 1e-30 else midpoint
    disc = qb * qb - 4 * qa * qc
    if disc < 0:
        return midpoint
    root = math.sqrt(disc)
    roots = [(-qb + root) / (2 * qa), (-qb - root) / (2 * qa)]
    lo, hi = min(mu_a, mu_b), max(mu_a, mu_b)
    between = [r for r in roots if lo <= r <= hi]
    candidates = between or roots
    return min(candidates, key=lambda r: abs(r - midpoint))


@register_selector("daw")
class DistributionAwareThreshold(Selector):
    context_keys = ("labeled_probs", "labeled_target")

    def __init__(
        self, num_classes: int, momentum: float = 0.99, tau_start: float = 0.95, ignore_index: int = IGNORE
    ):
        super().__init__(num_classes)
        if not 0.0 <= momentum < 1.0:
            raise self._error(f"momentum must lie in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.tau_start = float(tau_start)
        self.ignore_index = int(ignore_index)
        # (mean, variance) of C for correct and for incorrect labeled predictions; NaN = unseen.
        self.correct = torch.tensor([math.nan, math.nan], dtype=torch.float64)
        self.incorrect = torch.tensor([math.nan, math.nan], dtype=torch.float64)
        self.tau = self.tau_start

    def _select(self, probs, valid, moments, labeled_probs=None, labeled_target=None, **context):
        if (labeled_probs is None) != (labeled_target is None):
            raise self._error("needs both labeled_probs and labeled_target, or neither")
        if labeled_probs is not None:
            self._update(labeled_probs, labeled_target)
        return hard_selection(moments.label, moments.confidence >= self.tau, valid)

    def _update(self, labeled_probs, labeled_target):
        if labeled_probs.dim() != 4 or labeled_probs.shape[1] != self.num_classes:
            raise self._error(
                f"labeled_probs must have shape (B, {self.num_classes}, H, W), "
                f"got {tuple(labeled_probs.shape)}"
            )
        if tuple(labeled_target.shape) != (labeled_probs.shape[0], *labeled_probs.shape[2:]):
            raise self._error(
                f"labeled_target must have shape (B, H, W) matching labeled_probs, "
                f"got {tuple(labeled_target.shape)}"
            )
        labeled = class_moments(labeled_probs.float())
        conf, pred = labeled.confidence, labeled.label
        known = (labeled_target >= 0) & (labeled_target < self.num_classes)
        known &= labeled_target != self.ignore_index
        right = (pred == labeled_target) & known
        wrong = (pred != labeled_target) & known
        self.correct = self._ema(self.correct, conf[right])
        self.incorrect = self._ema(self.incorrect, conf[wrong])
        if not (torch.isnan(self.correct).any() or torch.isnan(self.incorrect).any()):
            crossing = gaussian_crossing(*self.correct.tolist(), *self.incorrect.tolist())
            self.tau = min(max(crossing, 1.0 / self.num_classes), 1.0)

    def _ema(self, stats: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if values.numel() == 0:
            return stats
        values = values.double()
        var = values.var(correction=1) if values.numel() > 1 else values.new_tensor(0.0)
        batch = torch.stack([values.mean(), var]).cpu()
        if torch.isnan(stats).any():
            return batch
        return self.momentum * stats + (1 - self.momentum) * batch

    def state_dict(self):
        return {"correct": self.correct.clone(), "incorrect": self.incorrect.clone(), "tau": self.tau}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.correct = state["correct"].double().clone()
        self.incorrect = state["incorrect"].double().clone()
        self.tau = float(state["tau"])
