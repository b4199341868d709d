"""A margin selector for cslbench, registered through the `cslbench.selectors` entry point."""

from __future__ import annotations

from bench.contract import Selector, hard_selection


class Margin(Selector):
    """Keep pixels whose top-1 minus top-2 probability is at least `gap` (weight 1, else 0).

    The label is the argmax. Stateless: it needs no context and keeps nothing between
    batches. Everything stays on the device, so a training step never waits for it.
    """

    def __init__(self, num_classes: int, gap: float = 0.5):
        super().__init__(num_classes)
        if not 0.0 <= gap <= 1.0:
            raise self._error(f"gap must lie in [0, 1], got {gap}")
        self.gap = float(gap)  # stored under its parameter's name: params() and repr() read it

    def _select(self, probs, valid, moments, **context):
        top2 = probs.topk(2, dim=1).values  # (B, 2, H, W); K >= 2 is checked by Selector.select
        return hard_selection(moments.label, (top2[:, 0] - top2[:, 1]) >= self.gap, valid)
