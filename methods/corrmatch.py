"""CorrMatch's dynamic threshold (Sun et al., CVPR 2024), the selection part.

Each step, before thresholding: for every class predicted at some valid pixel, the largest
confidence among those pixels; s = their mean over the classes present; then
tau <- m * tau + (1 - m) * s (no update when no pixel is valid). Kept: C >= tau, weight 1.
Defaults from the authors' code: tau_0 = 0.85 (their Pascal config), m = 0.999. The
statistic uses this view's own valid pixels (the code pairs the un-mixed prediction with the
CutMix-ed ignore mask). CorrMatch's correlation-map label propagation is framework, not
selection, and is left out. On Cityscapes the authors use tau = 0 (CorrMatch issue #12),
which is the `all` selector.
"""

from __future__ import annotations

import torch

from bench.contract import Selector, hard_selection


def class_max_confidence(confidence, label, valid, num_classes):
    """(K,) largest C among valid pixels predicted k; -1 where class k is not predicted."""
    slot = label.masked_fill(~valid, num_classes).flatten()  # slot K collects the invalid pixels
    out = torch.full((num_classes + 1,), -1.0, dtype=torch.float64, device=confidence.device)
    out = out.scatter_reduce(0, slot, confidence.flatten().double(), reduce="amax")
    return out[:num_classes]


class CorrMatchThreshold(Selector):
    def __init__(self, num_classes: int, tau_init: float = 0.85, momentum: float = 0.999):
        super().__init__(num_classes)
        if not 0.0 <= tau_init <= 1.0:
            raise self._error(f"tau_init must lie in [0, 1], got {tau_init}")
        if not 0.0 <= momentum < 1.0:
            raise self._error(f"momentum must lie in [0, 1), got {momentum}")
        self.tau_init, self.momentum = float(tau_init), float(momentum)
        self.tau = torch.tensor(self.tau_init, dtype=torch.float64)

    def _select(self, probs, valid, moments, **context):
        best = class_max_confidence(moments.confidence, moments.label, valid, self.num_classes)
        present = best >= 0
        s = torch.where(present, best, 0.0).sum() / present.sum().clamp(min=1)
        tau = self.tau.to(probs.device)
        self.tau = torch.where(present.any(), self.momentum * tau + (1 - self.momentum) * s, tau)
        return hard_selection(moments.label, moments.confidence >= self.tau.float(), valid)

    def state_dict(self):
        return {"tau": self.tau.detach().cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.tau = torch.as_tensor(state["tau"], dtype=torch.float64).clone()
