"""UPS: uncertainty-aware pseudo-label selection (Rizve et al., ICLR 2021).

From T stochastic teacher passes (context `mc_logits`, shape (T, B, K, H, W); the trainer
runs `mc_passes` of them with dropout on): the mean Pbar and the unbiased std S of the
softmax over passes. Label = argmax Pbar; positive where Pbar_max >= tau_p and
S[k*] < kappa_p. Pixels without a positive label get negative labels: class k != k* is a
negative where, at temperature `temperature`, Pbar_nl[k] < tau_n and S_nl[k] < kappa_n.
The `probs` argument is only validated; the MC passes decide.
"""

from __future__ import annotations

import torch

from bench.contract import Selector, hard_selection


def _std_mean_over_passes(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased std and mean over the leading pass axis, in two passes over the slices
    (torch.std_mean over a leading axis is ~60x slower on the CPU)."""
    mean = p.mean(dim=0)
    sq = torch.zeros_like(mean)
    for p_t in p:
        d = p_t - mean
        sq.addcmul_(d, d)
    return sq.div_(p.shape[0] - 1).sqrt_(), mean


class UncertaintyAware(Selector):
    context_keys = ("mc_logits",)
    required_context = ("mc_logits",)

    def __init__(
        self,
        num_classes: int,
        passes: int = 10,
        tau_p: float = 0.70,
        kappa_p: float = 0.05,
        tau_n: float = 0.05,
        kappa_n: float = 0.005,
        temperature: float = 2.0,
    ):
        super().__init__(num_classes)
        if passes < 2:
            raise self._error(f"passes must be >= 2 (the std needs two), got {passes}")
        if temperature <= 0:
            raise self._error(f"temperature must be > 0, got {temperature}")
        self.passes = int(passes)
        self.mc_passes = self.passes
        self.tau_p, self.kappa_p = float(tau_p), float(kappa_p)
        self.tau_n, self.kappa_n = float(tau_n), float(kappa_n)
        self.temperature = float(temperature)

    def _select(self, probs, valid, moments, mc_logits=None, **context):
        expected = (probs.shape[0], self.num_classes, *probs.shape[2:])
        if mc_logits.dim() != 5 or tuple(mc_logits.shape[1:]) != expected:
            raise self._error(
                f"mc_logits must have shape (T, B, K, H, W) with (B, K, H, W) = {expected}, "
                f"got {tuple(mc_logits.shape)}"
            )
        if mc_logits.shape[0] < 2:
            raise self._error(f"mc_logits needs T >= 2 passes, got T={mc_logits.shape[0]}")
        self._check(~torch.isfinite(mc_logits).all(), "mc_logits contains NaN or Inf", diverged=True)
        logits = mc_logits.float()
        std, mean = _std_mean_over_passes(logits.softmax(dim=2))
        conf, label = mean.max(dim=1)
        label_std = std.gather(1, label.unsqueeze(1)).squeeze(1)
        positive = (conf >= self.tau_p) & (label_std < self.kappa_p) & valid

        std_nl, mean_nl = _std_mean_over_passes((logits / self.temperature).softmax(dim=2))
        negatives = (mean_nl < self.tau_n) & (std_nl < self.kappa_n)
        negatives.scatter_(1, label.unsqueeze(1), False)  # never the pseudo-label itself
        negatives &= (valid & ~positive).unsqueeze(1)
        return hard_selection(label, positive, valid, negatives=negatives)
