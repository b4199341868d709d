"""The class moments in one read of the probabilities: a Triton kernel.

Each program takes a block of pixels of one image and walks the class axis once, keeping
a running maximum: a value above it moves the old maximum (times its tie count) into the
below-max sums, a value equal to it adds a tie, a smaller one goes to the sums directly.
So max, first argmax, tie count and the sums of the non-max probabilities and of their
squares come out of a single pass, and the (B, K, H, W) tensor is read exactly once
(`probs.max(1)` plus masked sums read it three times). The sums add only values below the
final maximum, never subtract it, as in bench/contract/confidence.py. NaN leaves the sums NaN, so
the selector's value checks still see it.

Runs on CUDA; on the CPU only through Triton's interpreter (TRITON_INTERPRET=1, slow:
for tests). Whether it beats the compiled reductions on a GPU is for `make gpu-check` to
measure (CSLBENCH_KERNELS=triton selects it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bench.contract.moments import ClassMoments

BLOCK = 1024


@triton.jit
def _moments_kernel(probs_ptr, conf_ptr, label_ptr, ties_ptr, sum_ptr, sq_ptr, num_classes, pixels, BLOCK: tl.constexpr):
    image = tl.program_id(1)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < pixels
    base = probs_ptr + image.to(tl.int64) * num_classes * pixels + offsets
    conf = tl.load(base, mask=inside, other=0.0).to(tl.float32)
    label = tl.zeros([BLOCK], dtype=tl.int64)
    ties = tl.full([BLOCK], 1.0, tl.float32)
    below_sum = tl.zeros([BLOCK], dtype=tl.float32)
    below_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(1, num_classes):
        v = tl.load(base + k * pixels, mask=inside, other=0.0).to(tl.float32)
        above = v > conf
        equal = v == conf
        moved = tl.where(above, ties * conf, v)  # what enters the below-max sums
        moved_sq = tl.where(above, ties * conf * conf, v * v)
        below_sum = tl.where(equal, below_sum, below_sum + moved)
        below_sq = tl.where(equal, below_sq, below_sq + moved_sq)
        ties = tl.where(above, 1.0, tl.where(equal, ties + 1.0, ties))
        label = tl.where(above, k, label)
        conf = tl.where(above, v, conf)
    out = image.to(tl.int64) * pixels + offsets
    tl.store(conf_ptr + out, conf, mask=inside)
    tl.store(label_ptr + out, label, mask=inside)
    tl.store(ties_ptr + out, ties, mask=inside)
    tl.store(sum_ptr + out, below_sum, mask=inside)
    tl.store(sq_ptr + out, below_sq, mask=inside)


def triton_class_moments(probs: Tensor) -> ClassMoments:
    """ClassMoments of (B, K, H, W) probs, read once (float32 results)."""
    b, k, h, w = probs.shape
    probs = probs.contiguous()
    maps = [torch.empty(b, h, w, dtype=torch.float32, device=probs.device) for _ in range(4)]
    label = torch.empty(b, h, w, dtype=torch.int64, device=probs.device)
    conf, ties, below_sum, below_sq = maps
    grid = (triton.cdiv(h * w, BLOCK), b)
    _moments_kernel[grid](probs, conf, label, ties, below_sum, below_sq, k, h * w, BLOCK=BLOCK)
    return ClassMoments(conf, label, ties, below_sum, below_sq)
