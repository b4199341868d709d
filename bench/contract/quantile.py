"""A percentile over the valid pixels without sorting them: `valid_quantile`.

Selectors that keep a share of the batch (S4MC, U2PL) need torch.nanquantile's number over
about a million float32 values. nanquantile sorts them in float64 (about 14 ms on 2 CPU
threads at 16x21x256x256); here the two order statistics it interpolates between are found
by a radix select on the float32 bits (two digit passes, each a histogram of 2**16
counts), and torch's own rank and `lerp` steps give the same float64 number.
Device-side only: no host read, no data-dependent shape.
"""

from __future__ import annotations

import math

import torch

from bench.contract.compiled import maybe_compiled

# The radix select reads the 32 bits of a float32 key in two 16-bit digits, from the top.
_DIGITS = ((16, 16), (0, 16))  # (shift, width)
_NAN_KEYS = (-2139095041, 0x7F800000)  # the ordered keys of -inf and +inf: NaN lies outside


def _ordered_keys(bits):
    """int32 keys of float32 values, given as their int32 bits, whose signed integer order
    is the values' order (NaN aside; -0 sorts just below +0, equal values either way)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _slots(bits, valid, prefix, shift: int, width: int):
    """(slot, weight) per value for a histogram of the digit at `shift` of the ordered keys,
    weight 1 for the valid non-NaN values that count, 0 for the rest (which keep their own
    digit as slot: spread, they hold up no count). Without `prefix` (the top digit) every
    member counts, its signed digit biased to 0..2**width - 1; with it, those whose higher
    bits equal prefix[0] (row 0) or else prefix[1] (row 1) count, at row * 2**width + digit."""
    keys = _ordered_keys(bits.flatten())
    member = valid.flatten() & (keys >= _NAN_KEYS[0]) & (keys <= _NAN_KEYS[1])
    size = 1 << width
    if prefix is None:
        return ((keys >> shift) + size // 2).long(), member.long()
    digit, high = ((keys >> shift) & (size - 1)).long(), (keys >> (shift + width)).long()
    second = member & (high != prefix[0]) & (high == prefix[1])
    return digit + second.long() * size, (member & (high == prefix[0])).long() + second.long()


@maybe_compiled
def first_digits(bits, valid):
    """(slots, weights) of the top digit of float32 values given as their int32 `bits` (a
    view, taken outside: a bitcast inside the compiled graph is not vectorised)."""
    shift, width = _DIGITS[0]
    return _slots(bits, valid, None, shift, width)


@maybe_compiled
def next_digits(bits, valid, prefix, shift: int, width: int):
    """(slots, weights) of the digit at `shift` for the values whose higher bits are
    prefix[0] (row 0) or else prefix[1] (row 1)."""
    return _slots(bits, valid, prefix, shift, width)


def _histogram(slots, weights, rows, size):
    """(rows, size) sums of `weights` by slot: `index_add_`, on the CPU a plain loop (faster
    than `scatter_add_`; `bincount` would read its size on the host)."""
    counts = torch.zeros(rows * size, dtype=torch.long, device=slots.device).index_add_(0, slots, weights)
    return counts.view(rows, size)


def _bucket_of(cum, rank):
    """Per row of cumulative counts (R, S) and 0-based ranks (R,): the bucket that holds each
    rank and the rank inside it. Past every count (no members) it gives the last bucket."""
    bucket = torch.searchsorted(cum, rank[..., None], right=True).squeeze(-1).clamp(max=cum.shape[-1] - 1)
    before = torch.where(bucket > 0, cum.gather(-1, (bucket - 1).clamp(min=0)[..., None]).squeeze(-1), 0)
    return bucket, rank - before


def valid_quantile(values, valid, fraction, like=None):
    """`torch.nanquantile(values.double().masked_fill(~valid, nan).flatten(), fraction)` for
    float32 `values`, bit for bit, without sorting them: torch's rank, rank = fraction *
    (n - 1) in float64 (n the valid non-NaN values; a negative rank, n = 0, is 0), the order
    statistics at floor(rank) and ceil(rank) found by a radix select on the float32 bits
    (per digit, from the top, a histogram of the members that share the higher digits of
    each rank's statistic; float32 to float64 is exact, so they are the numbers
    nanquantile's sort finds), and torch's own `lerp` with weight rank - floor(rank). No
    valid value gives NaN, as there. The digit passes are compiled when `like` (default
    `values`) is large enough."""
    if values.dtype != torch.float32:  # the keys are float32 bits
        return torch.nanquantile(values.double().masked_fill(~valid, math.nan).flatten(), fraction)
    like = values if like is None else like
    bits = values.view(torch.int32)
    slot, weight = first_digits.for_input(like)(bits, valid)
    shift, width = _DIGITS[0]
    size = 1 << width
    hist = _histogram(slot, weight, 1, size)
    count = hist.sum().reshape(1)
    rank = (count - 1).double() * fraction  # as nanquantile: q * (n - 1), negative ranks 0
    rank = rank.masked_fill(rank < 0, 0.0)
    below = rank.long()
    weight = rank - below
    ranks = torch.cat([below, rank.ceil().long()])  # (2,): floor and ceil
    bucket, ranks = _bucket_of(hist.cumsum(1).expand(2, size).contiguous(), ranks)
    prefix = bucket - size // 2  # the signed top digit of each statistic
    for shift, width in _DIGITS[1:]:
        size = 1 << width
        hist = _histogram(*next_digits.for_input(like)(bits, valid, prefix, shift, width), 2, size)
        rows = torch.stack([torch.zeros_like(prefix[0]), (prefix[1] != prefix[0]).long()])  # one prefix: both in row 0
        bucket, ranks = _bucket_of(hist.cumsum(1).index_select(0, rows), ranks)
        prefix = (prefix << width) | bucket
    key = prefix.int()
    found = _ordered_keys(key).view(torch.float32).double()  # (2,): the two order statistics (the map is its own inverse)
    lower = torch.where(count > 0, found[:1], math.nan)
    return lower.lerp_(found[1:], weight).reshape(())  # torch's lerp, as nanquantile's
