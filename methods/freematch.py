"""FreeMatch's self-adaptive thresholds (ICLR 2023), over pixels."""

from __future__ import annotations

import torch

from bench.contract import Selector, hard_selection


class SelfAdaptiveThreshold(Selector):
    """w = 1[C >= tau_t * p_t[k*] / max_k p_t[k]], with the global threshold
    tau_t = m tau + (1-m) mean(C) and class-wise p_t = m p + (1-m) mean(P) over the
    batch's valid pixels, updated before thresholding (tau_0 = 1/K, p_0 = 1/K)."""

    def __init__(self, num_classes: int, momentum: float = 0.999):
        super().__init__(num_classes)
        if not 0.0 <= momentum < 1.0:
            raise self._error(f"momentum must lie in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.tau = torch.tensor(1.0 / num_classes, dtype=torch.float64)
        self.p_model = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)

    def _select(self, probs, valid, moments, **context):
        m = self.momentum
        mask = valid.flatten(1).to(probs.dtype)  # (B, N)
        count = mask.sum().double()
        seen = count >= 1
        denom = count.clamp(min=1)
        mean_conf = (moments.confidence.flatten(1) * mask).sum(dtype=torch.float64) / denom
        # Class means as a batched mat-vec: one read of probs, no (B,K,H,W) temporary.
        class_sum = torch.bmm(probs.flatten(2), mask.unsqueeze(-1)).sum(dim=(0, 2))
        mean_probs = class_sum.double() / denom
        tau = self.tau.to(probs.device)
        p_model = self.p_model.to(probs.device)
        self.tau = torch.where(seen, m * tau + (1 - m) * mean_conf, tau)
        self.p_model = torch.where(seen, m * p_model + (1 - m) * mean_probs, p_model)
        class_scale = (self.p_model / self.p_model.max()).float()
        threshold = self.tau.float() * class_scale[moments.label]
        return hard_selection(moments.label, moments.confidence >= threshold, valid)

    def state_dict(self):
        return {"tau": self.tau.detach().cpu().clone(), "p_model": self.p_model.detach().cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.tau = state["tau"].double().clone()
        self.p_model = state["p_model"].double().clone()
