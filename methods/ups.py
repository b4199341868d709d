"""UPS: uncertainty-aware pseudo-label selection (Rizve et al., ICLR 2021).

From T stochastic teacher passes (context `mc_logits`, shape (T, B, K, H, W); the trainer
runs `mc_passes` of them with dropout on): the mean Pbar and the unbiased std S of the
softmax over passes. Label = argmax Pbar; positive where Pbar_max >= tau_p and
S[k*] < kappa_p. Pixels without a positive label get negative labels: class k != k* is a
negative where, at temperature `temperature`, Pbar_nl[k] < tau_n and S_nl[k] < kappa_n.
The `probs` argument is only validated; the MC passes decide.

Cost (docs/kernels.md): the moments over the passes come from
bench/contract/pass_moments.py (on large CPU batches two compiled passes over the logits,
nothing of size T x batch written), the square root is ATen's (inductor's float32 sqrt is
correctly rounded, ATen's here is not), and the decisions are one compiled pass. Bit for
bit the eager selection (tests/test_fused_selectors.py).
"""

from __future__ import annotations

import math

import torch

from bench.contract import Selector, hard_selection
from bench.contract.compiled import maybe_compiled
from bench.contract.pass_moments import softmax_moments


@maybe_compiled
def decisions(mean, std, mean_nl, std_nl, valid, tau_p: float, kappa_p: float, tau_n: float, kappa_n: float):
    """(label, positive, negatives as 0/1 floats): the eager decisions, with max's first
    index as the label; float masks because inductor writes bool tensors slowly."""
    K = mean.shape[1]
    conf = mean.amax(dim=1, keepdim=True)
    k = torch.arange(K, device=mean.device).view(1, K, 1, 1)
    label = torch.where(mean == conf, k, K).amin(dim=1, keepdim=True)
    is_label = k == label
    label_std = torch.where(is_label, std, -math.inf).amax(dim=1)
    positive = (conf.squeeze(1) >= tau_p) & (label_std < kappa_p) & valid
    negatives = (mean_nl < tau_n) & (std_nl < kappa_n) & ~is_label & (valid & ~positive).unsqueeze(1)
    return label.squeeze(1), positive.float(), negatives.float()


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
        moments, nonfinite = softmax_moments(mc_logits.float(), (1.0, self.temperature), ddof=1)  # unbiased
        self._check(nonfinite, "mc_logits contains NaN or Inf", diverged=True)
        (mean, var), (mean_nl, var_nl) = moments
        std, std_nl = var.sqrt_(), var_nl.sqrt_()  # ATen's sqrt
        fused = decisions.for_input(mean)
        if fused is not decisions.fn:
            label, positive, negatives = fused(mean, std, mean_nl, std_nl, valid, self.tau_p, self.kappa_p, self.tau_n, self.kappa_n)
            return hard_selection(label, positive.bool(), valid, negatives=negatives.bool())
        conf, label = mean.max(dim=1)
        label_std = std.gather(1, label.unsqueeze(1)).squeeze(1)
        positive = (conf >= self.tau_p) & (label_std < self.kappa_p) & valid
        negatives = (mean_nl < self.tau_n) & (std_nl < self.kappa_n)
        negatives.scatter_(1, label.unsqueeze(1), False)  # never the pseudo-label itself
        negatives &= (valid & ~positive).unsqueeze(1)
        return hard_selection(label, positive, valid, negatives=negatives)
