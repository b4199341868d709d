"""The order in which ATen's CPU kernel adds the slices of a sum over a strided axis.

`torch.sum` (and `mean`, which divides that sum) over an axis that is not the innermost,
such as the classes of (B, K, H, W) or the passes of (T, B, K, H, W), adds each output
element's slices as a cascade: 16 at a time into a first accumulator, which is then added
into a second (16 such blocks into a third from 2**16 slices on), and the accumulators
are added together at the end. Float addition is not associative, so a compiled kernel
that must give the eager float32 bits adds its slices in the same order: `aten_cpu_sum`.
Inductor keeps the order of the additions written (no reassociation). Equal to torch.sum
up to the sign of a zero sum (an accumulator here starts at the first slice, ATen's at +0).

ATen takes that path for every output column when the contiguous inner size (H * W for
the classes of (B, K, H, W)) is a multiple of 64: its columns then go in blocks of 4
vectors of up to 16 floats; a column past the last block is summed 4-way interleaved
instead (`cascade_applies`). Checked on 1 to 8 threads (tests/test_cpu_sum.py).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

_LEVELS = 4  # accumulators of the cascade
_BLOCK = 64  # floats per block of output columns: 4 vectors of 16 (AVX-512; 8 with AVX2)


def cascade_applies(inner: int) -> bool:
    """Whether torch.sum over a strided axis adds every column by the cascade, given the
    number of contiguous elements inside that axis."""
    return inner % _BLOCK == 0


def _add(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    if total is None:
        return term
    return total if term is None else total + term


def aten_cpu_sum(terms: Sequence[Tensor]) -> Tensor:
    """sum(terms) in the order of ATen's CPU cascade sum over len(terms) slices."""
    n = len(terms)
    if n == 0:
        raise ValueError("aten_cpu_sum needs at least one term")
    power = max(4, (n - 1).bit_length() // _LEVELS)  # log2 of the block size: 16 up to 2**16 terms
    step, mask = 1 << power, (1 << power) - 1
    acc: list[Tensor | None] = [None] * _LEVELS  # None: nothing added yet (zero)
    i = 0
    while i + step <= n:
        for _ in range(step):
            acc[0] = _add(acc[0], terms[i])
            i += 1
        for j in range(1, _LEVELS):  # carry a full block one level up
            acc[j], acc[j - 1] = _add(acc[j], acc[j - 1]), None
            if i & (mask << (j * power)):
                break
    for k in range(i, n):
        acc[0] = _add(acc[0], terms[k])
    total = acc[0]
    for j in range(1, _LEVELS):
        total = _add(total, acc[j])
    return total
