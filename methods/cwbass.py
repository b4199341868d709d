"""CW-BASS's confidence-weighted selection (Tarubinga et al., IJCNN 2025), without its
boundary module.

tau = clip(base / (1 + exp(-beta * (mean C - 0.5))), 0.3, 0.8), with mean C over the batch's
valid pixels (the authors' code averages over every pixel [A]); kept: C > tau (strict), with
weight w = (d * C)^gamma, d = decay_factor when use_decay else 1. Defaults from the released
code (main.py): base 0.6, beta 0.5, gamma 1, decay off (0.9 when on, a constant factor, not
a per-epoch schedule). The abstract's "learned" threshold and the README's "progressive"
decay are not in the released code; we implement the code. The rule itself keeps no state
across steps; the last threshold is kept in `state_dict` so that a resumed run reports it.
Since tau moves only within about [0.30, 0.34] for K >= 10, the gate keeps almost every
pixel with C > 1/3. `reliable` is the gate (its weights stay soft).
"""

from __future__ import annotations

import torch

from bench.contract import Selector, masked_mean, soft_selection

TAU_BOUNDS = (0.3, 0.8)  # hard-coded in the authors' code


class ConfidenceWeighted(Selector):
    def __init__(
        self,
        num_classes: int,
        base: float = 0.6,
        beta: float = 0.5,
        gamma: float = 1.0,
        use_decay: bool = False,
        decay_factor: float = 0.9,
    ):
        super().__init__(num_classes)
        if base <= 0:
            raise self._error(f"base must be > 0, got {base}")
        if gamma < 0:
            raise self._error(f"gamma must be >= 0, got {gamma}")
        if not 0.0 < decay_factor <= 1.0:
            raise self._error(f"decay_factor must lie in (0, 1], got {decay_factor}")
        self.base, self.beta, self.gamma = float(base), float(beta), float(gamma)
        self.use_decay, self.decay_factor = bool(use_decay), float(decay_factor)
        self.tau = torch.tensor(float("nan"), dtype=torch.float64)  # last threshold used

    def threshold(self, mean_confidence):
        return (self.base * torch.sigmoid(self.beta * (mean_confidence - 0.5))).clamp(*TAU_BOUNDS)

    def _select(self, probs, valid, moments, **context):
        conf = moments.confidence
        mean, _ = masked_mean(conf.double(), valid)
        tau = self.threshold(mean)
        self.tau = tau
        gate = conf > tau.float()
        scaled = conf * self.decay_factor if self.use_decay else conf
        weight = torch.where(gate, scaled.pow(self.gamma), 0.0)
        return soft_selection(moments.label, weight, valid, reliable=gate)

    def state_dict(self):
        return {"tau": self.tau.detach().cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.tau = torch.as_tensor(state["tau"], dtype=torch.float64).clone()
