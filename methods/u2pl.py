"""U2PL's entropy-percentile filtering (CVPR 2022).

Keeps the valid pixels whose entropy is at most the p_t-th percentile of the batch's valid
pixels, p_t = 100 - drop_0 * (1 - progress): 80 at the start of training (drop the most
uncertain 20%), 100 at the end. The percentile interpolates linearly between order
statistics, as numpy.percentile does. U2PL's contrastive use of the dropped pixels is a
separate loss and not part of selection. Without `progress` in the context the start-of-
training percentile applies.

Cost (docs/kernels.md): the percentile is a radix select with torch.nanquantile's number
(bench/contract/quantile.py), not a sort of the batch in float64. On large CPU batches the
entropy's products and their sum over K are one compiled pass (`entropy_sum`) that adds the
class slices in ATen's order (bench/contract/cpu_sum.py), reading the probabilities and
ATen's log of them: inductor's log rounds differently, and the clamp at 1e-30 becomes a
`where` on the log (ATen's log gives a value the same number wherever it stands). The
selection is bit for bit the eager formula's (tests/test_fused_selectors.py).
"""

from __future__ import annotations

import torch

from bench.contract import Selector, hard_selection
from bench.contract.compiled import maybe_compiled
from bench.contract.cpu_sum import aten_cpu_sum, cascade_applies
from bench.contract.quantile import valid_quantile

FLOOR = 1e-30  # probabilities below it enter the entropy as FLOOR
LOG_FLOOR = float(torch.log(torch.tensor(FLOOR)))  # ATen's log(float32(FLOOR)), a float32 value


def pixel_entropy(probs):
    """(B, H, W): -sum_k p_k log max(p_k, FLOOR), as `-(probs * log(probs.clamp(FLOOR))).sum(1)`."""
    fused = entropy_sum.for_input(probs)
    in_order = probs.device.type == "cpu" and probs.is_contiguous() and cascade_applies(probs[0, 0].numel())
    if fused is entropy_sum.fn or not in_order:  # eager, or a sum whose order is not the cascade
        return -(probs * torch.log(probs.clamp(min=FLOOR))).sum(dim=1)
    return fused(probs, torch.log(probs))


@maybe_compiled
def entropy_sum(probs, log_probs):
    """`pixel_entropy` from ATen's `log(probs)`, compiled: each class's product, FLOOR's log
    where p < FLOOR (what the clamp gives), added over the classes in ATen's order."""
    terms = [p * torch.where(p < FLOOR, LOG_FLOOR, log_p) for p, log_p in zip(probs.unbind(1), log_probs.unbind(1))]
    return -aten_cpu_sum(terms)


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
        entropy = pixel_entropy(probs)
        # nanquantile over the valid pixels interpolates as numpy.percentile does, without
        # learning their number on the host (x[valid] would); no valid pixel: NaN, none kept
        threshold = valid_quantile(entropy, valid, q / 100.0, like=probs)
        return hard_selection(moments.label, entropy <= threshold, valid)
