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

from bench.contract.confidence import class_moments
from bench.labels import IGNORE
from bench.contract import Selector, hard_selection


def gaussian_crossing(mu_a, var_a, mu_b, var_b) -> torch.Tensor:
    """Where the densities N(mu_a, var_a) and N(mu_b, var_b) are equal, between the means.

    Float64 tensor algebra with every branch taken by `torch.where`, so the threshold is
    updated on the device without a host read."""
    mu_a, var_a, mu_b, var_b = (torch.as_tensor(v, dtype=torch.float64) for v in (mu_a, var_a, mu_b, var_b))
    midpoint = 0.5 * (mu_a + mu_b)
    var_a, var_b = var_a.clamp(min=1e-12), var_b.clamp(min=1e-12)
    # (x-mu_a)^2/(2 var_a) - (x-mu_b)^2/(2 var_b) + 0.5 log(var_a/var_b) = 0
    qa = 0.5 / var_a - 0.5 / var_b
    qb = mu_b / var_b - mu_a / var_a
    qc = 0.5 * mu_a**2 / var_a - 0.5 * mu_b**2 / var_b + 0.5 * torch.log(var_a / var_b)
    linear = qa.abs() < 1e-12 * (qb.abs() + qc.abs() + 1e-30)
    linear_root = torch.where(qb.abs() > 1e-30, -qc / qb, midpoint)
    disc = qb * qb - 4 * qa * qc
    root = disc.clamp(min=0).sqrt()
    r1, r2 = (-qb + root) / (2 * qa), (-qb - root) / (2 * qa)
    lo, hi = torch.minimum(mu_a, mu_b), torch.maximum(mu_a, mu_b)
    in1, in2 = (lo <= r1) & (r1 <= hi), (lo <= r2) & (r2 <= hi)
    # the root between the means; if both or neither are, the one nearer the midpoint
    take_first = (in1 & ~in2) | ((in1 == in2) & ((r1 - midpoint).abs() <= (r2 - midpoint).abs()))
    quadratic = torch.where(disc < 0, midpoint, torch.where(take_first, r1, r2))
    return torch.where(linear, linear_root, quadratic)


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
        self.tau = torch.tensor(self.tau_start, dtype=torch.float64)

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
        self.correct = self._ema(self.correct, conf, (pred == labeled_target) & known)
        self.incorrect = self._ema(self.incorrect, conf, (pred != labeled_target) & known)
        fitted = ~(self.correct.isnan().any() | self.incorrect.isnan().any())
        crossing = gaussian_crossing(*self.correct.unbind(), *self.incorrect.unbind())
        self.tau = torch.where(fitted, crossing.clamp(1.0 / self.num_classes, 1.0), self.tau)

    def _ema(self, stats: torch.Tensor, conf: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """EMA of (mean, unbiased variance) of `conf` over `members`; unchanged when there
        are none, the batch's own statistics when there were none before."""
        stats = stats.to(conf.device)
        n = members.sum(dtype=torch.float64)
        values = conf.double()
        mean = torch.where(members, values, 0.0).sum() / n.clamp(min=1)
        var = torch.where(members, (values - mean).square(), 0.0).sum() / (n - 1).clamp(min=1)
        batch = torch.stack([mean, var])
        updated = torch.where(stats.isnan(), batch, self.momentum * stats + (1 - self.momentum) * batch)
        return torch.where(n > 0, updated, stats)

    def state_dict(self):
        return {"correct": self.correct.cpu().clone(), "incorrect": self.incorrect.cpu().clone(), "tau": float(self.tau)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.correct = state["correct"].double().clone()
        self.incorrect = state["incorrect"].double().clone()
        self.tau = torch.tensor(float(state["tau"]), dtype=torch.float64)
