"""Fixed confidence threshold (FixMatch, UniMatch) and the keep-everything baseline."""

from __future__ import annotations

from bench.contract import Selector, hard_selection


class FixedThreshold(Selector):
    """w = 1[C >= tau]."""

    def __init__(self, num_classes: int, tau: float = 0.95):
        super().__init__(num_classes)
        if not 0.0 <= tau <= 1.0:
            raise self._error(f"tau must lie in [0, 1], got {tau}")
        self.tau = float(tau)

    def _select(self, probs, valid, moments, **context):
        return hard_selection(moments.label, moments.confidence >= self.tau, valid)


class AllPixels(Selector):
    """Every valid pixel with weight 1: the no-selection baseline."""

    def _select(self, probs, valid, moments, **context):
        return hard_selection(moments.label, valid, valid)
