"""Per-pixel statistics of a class-probability map, read in one sweep over the class axis.

Every selector needs the max confidence and the pseudo-label; CSL and CoVar also need the
sum and sum of squares of the non-max probabilities (from which the residual-class
variance follows on the (B, H, W) maps). Reading the (B, K, H, W) tensor once for all of
them is what keeps selection at the cost of a bare threshold.

The sums leave out the maximum itself rather than subtracting C and C^2 afterwards: for a
confident pixel sum(P^2) - C^2 cancels to float32 noise (C = 0.999 leaves residual squares
near 1e-7, the size of the rounding error of the sum).
"""

from __future__ import annotations

import os
import torch
from torch import Tensor

from bench.contract.compiled import kernel_mode, maybe_compiled, should_compile
from bench.contract.moments import ClassMoments


def triton_can_run(probs: Tensor) -> bool:
    return probs.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def class_moments(probs: Tensor) -> ClassMoments:
    """Max, argmax and the sums of the non-max probabilities of (B, K, H, W) probs."""
    if kernel_mode() == "triton" and triton_can_run(probs):
        from bench.contract.triton_moments import triton_class_moments

        return triton_class_moments(probs)
    if probs.device.type == "cpu" and not should_compile(probs):
        return _class_moments_cpu(probs)
    return ClassMoments(*_reduced_moments(probs))


@maybe_compiled
def _reduced_moments(probs: Tensor) -> tuple[Tensor, ...]:
    # One reduction per statistic: on a GPU each runs at memory speed (a loop over classes
    # would launch ~6K small kernels); compiled, they fuse into a few passes.
    k = probs.shape[1]
    confidence = probs.amax(dim=1, keepdim=True)
    is_max = probs == confidence
    index = torch.arange(k, device=probs.device).view(1, k, 1, 1)
    label = torch.where(is_max, index, k).amin(dim=1).clamp_(max=k - 1)  # first max; NaN rows: K-1
    below = torch.where(is_max, 0.0, probs)
    ties = is_max.sum(dim=1, dtype=probs.dtype)
    return confidence.squeeze(1), label, ties, below.sum(dim=1), (below * below).sum(dim=1)


def _class_moments_cpu(probs: Tensor) -> ClassMoments:
    # On the CPU, max-with-indices over a strided axis is compute bound (about 9x slower
    # than amax). amax plus one sweep over the class slices, with the (B, H, W)
    # accumulators resident in cache, costs less than the bare probs.max(1). Every
    # per-class step is float arithmetic on preallocated buffers: masked_fill and uint8
    # ops are several times slower here than a float multiply.
    num_classes = probs.shape[1]
    confidence = probs.amax(dim=1)
    below_sum = torch.zeros_like(confidence)
    below_sq = torch.zeros_like(confidence)
    n_below = torch.zeros_like(confidence)
    label = torch.full_like(confidence, float(num_classes))
    not_max = torch.empty_like(confidence)  # 1.0 where P_k < C
    below = torch.empty_like(confidence)
    candidate = torch.empty_like(confidence)
    for k in range(num_classes):
        p_k = probs[:, k]
        torch.ne(p_k, confidence, out=not_max)
        torch.mul(p_k, not_max, out=below)
        below_sum.add_(below)
        below_sq.addcmul_(below, below)
        n_below.add_(not_max)
        # label = the smallest k with P_k == C: candidate is k there, >= K elsewhere.
        torch.mul(not_max, num_classes, out=candidate).add_(k)
        torch.minimum(label, candidate, out=label)
    ties = n_below.neg_().add_(num_classes)
    # A NaN row equals no C and would keep the sentinel K: clamp it to a real class, so a
    # diverged step fails in the value checks rather than as an index error in a loss.
    return ClassMoments(confidence, label.clamp_(max=num_classes - 1).long(), ties, below_sum, below_sq)
