"""Mean and squared deviations over stochastic passes of their softmax (UPS, CSA).

`softmax_moments(logits, temperatures, ddof)` takes T passes of logits, (T, B, K, H, W)
float32, and gives for each temperature t the mean over the passes of softmax(logits / t)
along the classes and the variance (the squared deviations from that mean summed and
divided by T - ddof), (B, K, H, W) each, plus whether any logit is NaN or infinite.

Eagerly that is ATen's softmax of all T passes (T times the batch, written out), the mean
over the pass axis, one `addcmul` per pass and a division. On large CPU batches two
compiled passes over the logits give the same float32 numbers without writing any softmax:
the first finds, per pass and pixel, the max and min over K (a NaN or an infinity shows in
one of them) and each temperature's sum of exp(x - max); the second computes each softmax
value once, as ATen's softmax does (exp, then a division by that sum; inductor's exp and
sequential sum over K are ATen softmax's), and uses it for the mean, added over the passes
in ATen's order (bench/contract/cpu_sum.py), and for the deviations, accumulated by fused
multiply-adds (`torch.ops.prims.fma`) as ATen's `addcmul` rounds them on AVX2/AVX-512 CPUs.
tests/test_fused_selectors.py compares the two bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bench.contract.compiled import maybe_compiled
from bench.contract.cpu_sum import aten_cpu_sum, cascade_applies


def softmax_moments(logits: Tensor, temperatures: tuple[float, ...] = (1.0,), ddof: int = 0) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """([(mean, variance) per temperature], any logit NaN or infinite)."""
    temperatures, divisor = tuple(float(t) for t in temperatures), logits.shape[0] - ddof
    stats = softmax_stats.for_input(logits)
    in_order = logits.device.type == "cpu" and logits.is_contiguous() and cascade_applies(logits[0].numel())
    if stats is softmax_stats.fn or not in_order:  # eager, or a mean whose order is not the cascade
        return [_eager_moments(logits, t, divisor) for t in temperatures], ~torch.isfinite(logits).all()
    from torch._inductor import inductor_prims  # noqa: F401 (registers torch.ops.prims.fma)

    top, totals, nonfinite = stats(logits, temperatures)
    moments = fused_moments.for_input(logits)(logits, top, totals, temperatures, divisor)
    if fused_moments.failed:  # the compiler gave up: run eagerly, its exp is not softmax's
        moments = [_eager_moments(logits, t, divisor) for t in temperatures]
    return moments, nonfinite


def _eager_moments(logits, temperature, divisor):
    """(mean, variance) of softmax(logits / temperature) over the passes, the eager way."""
    p = (logits if temperature == 1.0 else logits / temperature).softmax(dim=2)
    mean = p.mean(dim=0)
    sq = torch.zeros_like(mean)
    for p_t in p:
        d = p_t - mean
        sq.addcmul_(d, d)
    return mean, sq.div_(divisor)


@maybe_compiled
def softmax_stats(logits, temperatures: tuple[float, ...]):
    """(max, [sum of exp(x / t - max / t) per temperature]) over the classes, each (T, B, 1,
    H, W): what the softmax of x / t subtracts and divides by (the max of x / t is max(x) / t
    exactly: rounding is monotone); and whether any logit is NaN or infinite (then the max
    or the min over its classes is)."""
    top = logits.amax(2, keepdim=True)
    bottom = logits.amin(2, keepdim=True)
    totals = [(_scaled(logits, t) - _scaled(top, t)).exp().sum(2, keepdim=True) for t in temperatures]
    return top, totals, ~(torch.isfinite(top).all() & torch.isfinite(bottom).all())


@maybe_compiled
def fused_moments(logits, top, totals, temperatures: tuple[float, ...], divisor: int):
    """`_eager_moments` per temperature from `softmax_stats`, every softmax value computed
    once (compiled: in registers) for the mean and the deviations."""
    out = []
    for t, total in zip(temperatures, totals):
        shift = _scaled(top, t)
        p = [(_scaled(logits[i], t) - shift[i]).exp() / total[i] for i in range(logits.shape[0])]
        mean = aten_cpu_sum(p) / len(p)
        sq = torch.zeros_like(mean)
        for p_i in p:
            d = p_i - mean
            sq = torch.ops.prims.fma(d, d, sq)  # addcmul's single rounding; inductor's addcmul rounds twice
        out.append((mean, sq / divisor))
    return out


def _scaled(x, temperature):
    return x if temperature == 1.0 else x / temperature
