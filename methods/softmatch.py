"""SoftMatch's truncated Gaussian weighting (ICLR 2023), over pixels."""

from __future__ import annotations

import torch

from bench.contract import Selector, soft_selection


class TruncatedGaussian(Selector):
    """w = exp(-min(C - mu_t, 0)^2 / (2 var_t / n_sigma^2)), with EMA estimates of the mean
    and variance of C over valid pixels, updated with the current batch before weighting.

    Start values as in the authors' code: mu_0 = 1/K, var_0 = 1. The batch variance is
    unbiased; a batch with fewer than two valid pixels updates the mean only (one pixel)
    or nothing (none)."""

    def __init__(self, num_classes: int, momentum: float = 0.999, n_sigma: float = 2.0):
        super().__init__(num_classes)
        if not 0.0 <= momentum < 1.0:
            raise self._error(f"momentum must lie in [0, 1), got {momentum}")
        if n_sigma <= 0:
            raise self._error(f"n_sigma must be > 0, got {n_sigma}")
        self.momentum = float(momentum)
        self.n_sigma = float(n_sigma)
        self.mu = torch.tensor(1.0 / num_classes, dtype=torch.float64)
        self.var = torch.tensor(1.0, dtype=torch.float64)

    def _select(self, probs, valid, moments, **context):
        conf = moments.confidence
        m = self.momentum
        count = valid.sum().double()
        total = torch.where(valid, conf, 0.0).sum(dtype=torch.float64)
        mean = total / count.clamp(min=1)
        sq_dev = torch.where(valid, conf.double() - mean, 0.0).pow(2).sum()
        var = sq_dev / (count - 1).clamp(min=1)
        mu_dev = self.mu.to(conf.device)
        var_dev = self.var.to(conf.device)
        self.mu = torch.where(count >= 1, m * mu_dev + (1 - m) * mean, mu_dev)
        self.var = torch.where(count >= 2, m * var_dev + (1 - m) * var, var_dev)
        mu_t = self.mu.float()
        scale = (2.0 * self.var / self.n_sigma**2).float().clamp(min=1e-12)
        shortfall = (conf - mu_t).clamp(max=0.0)
        weight = torch.exp(-shortfall.square() / scale)
        return soft_selection(moments.label, weight, valid, reliable=conf >= mu_t)

    def state_dict(self):
        return {"mu": self.mu.detach().cpu().clone(), "var": self.var.detach().cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.mu = state["mu"].double().clone()
        self.var = state["var"].double().clone()
