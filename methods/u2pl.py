"""U2PL's entropy-percentile filtering (CVPR 2022).

Keeps the valid pixels whose entropy is at most the p_t-th percentile of the batch's valid
pixels, p_t = 100 - drop_0 * (1 - progress): 80 at the start of training (drop the most
uncertain 20%), 100 at the end. The percentile interpolates linearly between order
statistics, as numpy.percentile does. U2PL's contrastive use of the dropped pixels is a
separate loss and not part of selection. Without `progress` in the context the start-of-
training percentile applies.
"""

from __future__ import annotations

import math

import torch

from bench.contract import Selector, hard_selection


class EntropyPercentile(Selector):
    context_keys = ("progress",)

    def __init__(self, num_classes: int, drop_start: float = 20.0):
        super().__init__(num_classes)
        if not 0.0 <= drop_start <= 100.0:
            raise self._error(f"drop_start must be a percentage in [0, 100], got {drop_start}")
        self.drop_start = float(drop_start)

    def keep_percentile(self, progress: float) -> float:
        if not 0.0 <= progress <= 1.0:
            raise self._error(f"progress must lie in [0, 1], got {progress}")
        return 100.0 - self.drop_start * (1.0 - progress)

    def _select(self, probs, valid, moments, progress: float = 0.0, **context):
        q = self.keep_percentile(float(progress))
        entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum(dim=1)
        # nanquantile over the valid pixels interpolates as numpy.percentile does, without
        # learning their number on the host (x[valid] would); no valid pixel: NaN, none kept
        threshold = torch.nanquantile(entropy.double().masked_fill(~valid, math.nan).flatten(), q / 100.0)  # float64: exact ranks
        return hard_selection(moments.label, entropy <= threshold, valid)
