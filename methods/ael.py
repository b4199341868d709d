"""AEL's confidence-powered weights (NeurIPS 2021): w = C^gamma."""

from __future__ import annotations

from bench.contract import Selector, soft_selection


class ConfidencePower(Selector):
    """Soft weights; as for every soft selector the reliable set is the pixels at full
    weight (here C == 1), so AEL is judged by its weighted precision."""

    def __init__(self, num_classes: int, gamma: float = 2.0):
        super().__init__(num_classes)
        if gamma <= 0:
            raise self._error(f"gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)

    def _select(self, probs, valid, moments, **context):
        return soft_selection(moments.label, moments.confidence.pow(self.gamma), valid)
