"""SemiVL's image-level confidence weights (Hoyer et al., ECCV 2024), `pixelratio` and
`pixelavg` modes of its `confidence_weighted_loss`.

`semivl_ratio`: every valid pixel of image b gets w = r_b, the share of b's valid pixels
with C >= tau. `semivl_avg`: w = a_b, the mean C over b's valid pixels. Neither drops a
pixel: low-confidence pixels train with their image's weight. An image with no valid pixel
gets weight 0 (the authors' code divides 0 by 0 there).

Ours, not the source's [A]: the source multiplies an unmasked loss, so padding pixels are
weighted too; here weights are 0 outside `valid`. For `pixelavg` the source multiplies the
batch's summed loss by each image's mean and sums, i.e. every pixel gets sum_b a_b (> 1 for
B > 1); its published Cityscapes runs used one image per GPU, where that equals the per-image
a_b used here. SemiVL's `pixelwise` mode is exactly `fixed` (tau 0.95) and is not registered
again. Neither mode has a gate, so `reliable` is every pixel with w > 0; the weighted
precision is the meaningful selection number for them.
"""

from __future__ import annotations

import torch

from bench.contract import Selector, soft_selection
from methods.fixed import FixedThreshold


def _per_image(values, valid):
    """Mean of `values` over each image's valid pixels, (B,), 0 for an image with none."""
    count = valid.flatten(1).sum(1)
    total = torch.where(valid, values, 0.0).flatten(1).sum(1, dtype=torch.float64)
    return (total / count.clamp(min=1)).float()


def _image_weight(label, per_image, valid):
    weight = per_image[:, None, None].expand(valid.shape)
    return soft_selection(label, weight, valid, reliable=weight > 0)


class ConfidentPixelRatio(FixedThreshold):
    """w = r_b = #(valid & C >= tau in image b) / #valid in b, on b's valid pixels (the
    threshold and its check are fixed's)."""

    def _select(self, probs, valid, moments, **context):
        ratio = _per_image((moments.confidence >= self.tau).float(), valid)
        return _image_weight(moments.label, ratio, valid)


class MeanConfidence(Selector):
    """w = a_b = mean of C over image b's valid pixels, on b's valid pixels."""

    def _select(self, probs, valid, moments, **context):
        return _image_weight(moments.label, _per_image(moments.confidence, valid), valid)
