"""S4MC: semi-supervised segmentation with marginal contextual information (Kimhi et al.,
TMLR 2024), as in the authors' official (U2PL-based) code.

Refinement, per class c and pixel i: the top-1 of the neighbours' p_j^c (4- or 8-connected;
off-image and, ours [A], invalid neighbours count as p = 0), then the union of events
    q = p_i + beta * n - beta * max(p_i * n, p_i * E_c),   beta = exp(-1/2),
with E_c = P(neighbour labelled c | pixel labelled c). q is not renormalised and stays in
[0, 1]. With more neighbours (`neighbours` > 1) the update repeats with each next-largest
neighbour value, always from the unrefined map. Indicator of the refined q: margin (top-1
minus top-2, default), confidence (max) or entropy. Kept: refined margin (or confidence) >
gamma_t, or refined entropy < gamma_t, where gamma_t is the percentile of the *unrefined*
indicator over the batch's valid pixels at 100 - keep_t (entropy: at keep_t), keep_t = 100 -
(100 - keep_start) * (1 - progress): 60 % at the start, 100 % at the end, numpy's linear
interpolation. Since refined scores meet the unrefined distribution, more than keep_t % is
kept: the point of the method. Label: argmax of the unrefined P; weight 1.

E_c (the source hard-codes per-dataset tables measured on labelled ground truth): by
default accumulated from the labelled batches' ground truth (context `labeled_target`): the
share of in-image 4-neighbour pairs, both labels valid, whose centre is c and whose
neighbour is also c; kept in the state dict; a class not seen yet has E_c = 0, which is
independence. `e_joint="independent"` always uses p_i * n; a list of K values fixes E.
The authors' UniMatch port refines the class-agnostic max confidence instead; that is not
this method and is not shipped.

Cost (docs/kernels.md): one sweep over the class slices computes the margin (or
confidence) of P and of q with a running top-2, never the (N, B, K, H, W) neighbour stack
or a sort over K; large CPU batches compile that sweep into one pass. The percentile is a
radix select on the float32 bits plus torch's own rank and lerp steps, the number
torch.nanquantile gives, without sorting the batch. The selection is bit for bit that of
the whole-tensor formulas (tests/test_selectors_2024.py); entropy keeps them (its sum over
K is order-sensitive).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.contract import Selector, hard_selection
from bench.contract.compiled import maybe_compiled

BETA = math.exp(-0.5)
INDICATORS = ("margin", "confidence", "entropy")
_OFFSETS = {4: ((-1, 0), (1, 0), (0, -1), (0, 1)), 8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))}


def neighbour_values(probs, valid, connectivity):
    """(N, B, K, H, W): each neighbour's probabilities at every pixel, 0 off-image or invalid."""
    p = probs.masked_fill(~valid[:, None], 0.0)
    padded = F.pad(p, (1, 1, 1, 1))
    H, W = probs.shape[-2:]
    return torch.stack([padded[..., 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] for dy, dx in _OFFSETS[connectivity]])


def neighbour_max(probs, valid, connectivity):
    """(B, K, H, W): `neighbour_values(...).amax(0)` as a running maximum over shifted views
    of the padded map, without the (N, B, K, H, W) stack (a max is exact in any order)."""
    p = probs.masked_fill(~valid[:, None], 0.0)
    padded = F.pad(p, (1, 1, 1, 1))
    H, W = probs.shape[-2:]
    views = [padded[..., 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] for dy, dx in _OFFSETS[connectivity]]
    out = torch.maximum(views[0], views[1])
    for view in views[2:]:
        torch.maximum(out, view, out=out)
    return out


def indicator(q, kind):
    if kind == "confidence":
        return q.amax(dim=1)
    if kind == "margin":
        top2 = q.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    return -(q * torch.log(q + 1e-10)).sum(dim=1)


# The radix select reads the 32 bits of a float32 key in three digits, from the top: 11, 11
# and 10 bits (histograms of 2048 counts: small, and read without threads).
_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, width)


def _ordered_keys(bits):
    """int32 keys of float32 values, given as their int32 bits, whose signed integer order
    is the values' order (NaN aside; -0 sorts just below +0, equal values either way)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@maybe_compiled
def _first_digits(bits, valid):
    """(keys, member, slots, count) of float32 values given as their int32 `bits` (a view,
    taken outside: a bitcast inside the compiled graph is not vectorised): their flat
    `_ordered_keys`, which count (valid, not NaN), the top digit of each key as a histogram
    slot (biased to 0..2047: the keys are signed; 2048 for the rest) and how many count."""
    flat = bits.flatten()
    member = valid.flatten() & ((flat & 0x7FFFFFFF) <= 0x7F800000)  # NaN: exponent all ones, mantissa not 0
    keys = _ordered_keys(flat)
    shift, width = _DIGITS[0]
    return keys, member, torch.where(member, ((keys >> shift) + (1 << (width - 1))).long(), 1 << width), member.sum()


@maybe_compiled
def _next_digits(keys, member, prefix, shift: int, width: int):
    """Histogram slots of the digit at `shift` for the members whose higher bits are
    prefix[0] (row 0) or else prefix[1] (row 1): 0 .. 2 * 2**width - 1; the rest 2 * 2**width."""
    size = 1 << width
    digit = ((keys >> shift) & (size - 1)).long()
    high = (keys >> (shift + width)).long()
    return torch.where(member & (high == prefix[0]), digit, torch.where(member & (high == prefix[1]), digit + size, 2 * size))


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
    valid value gives NaN, as there. Device-side only: no host read, no data-dependent
    shape. The digit passes are compiled when `like` (default `values`) is large enough."""
    if values.dtype != torch.float32:  # the keys are float32 bits
        return torch.nanquantile(values.double().masked_fill(~valid, math.nan).flatten(), fraction)
    like = values if like is None else like
    keys, member, slot, count = _first_digits.for_input(like)(values.view(torch.int32), valid)
    count = count.reshape(1)
    rank = (count - 1).double() * fraction  # as nanquantile: q * (n - 1), negative ranks 0
    rank = rank.masked_fill(rank < 0, 0.0)
    below = rank.long()
    weight = rank - below
    ranks = torch.cat([below, rank.ceil().long()])  # (2,): floor and ceil
    size = 1 << _DIGITS[0][1]
    hist = torch.zeros(size + 1, dtype=torch.long, device=keys.device).scatter_add_(0, slot, torch.ones_like(slot))
    bucket, ranks = _bucket_of(hist[:size].cumsum(0).expand(2, size).contiguous(), ranks)
    prefix = bucket - size // 2  # the signed top digit of each statistic
    for shift, width in _DIGITS[1:]:
        size = 1 << width
        slot = _next_digits.for_input(like)(keys, member, prefix, shift, width)
        hist = torch.zeros(2 * size + 1, dtype=torch.long, device=keys.device).scatter_add_(0, slot, torch.ones_like(slot))
        rows = torch.stack([torch.zeros_like(prefix[0]), (prefix[1] != prefix[0]).long()])  # one prefix: both in row 0
        bucket, ranks = _bucket_of(hist[: 2 * size].view(2, size).cumsum(1).index_select(0, rows), ranks)
        prefix = (prefix << width) | bucket
    key = prefix.int()
    found = (key ^ ((key >> 31) & 0x7FFFFFFF)).view(torch.float32).double()  # (2,): the two order statistics
    lower = torch.where(count > 0, found[:1], math.nan)
    return lower.lerp_(found[1:], weight).reshape(())  # torch's lerp, as nanquantile's


def same_class_pair_counts(target, num_classes):
    """(same, total), each (K,) float64: in-image 4-neighbour pairs with both labels valid, by
    the centre's class; `same` those whose neighbour has the same class. Counted per pixel
    (how many of its 4 neighbours are valid, how many share its class: 0-4 each, uint8) and
    then per class in one histogram of (class, valid neighbours, same neighbours): integer
    counts, so the same numbers as adding the pairs one direction at a time."""
    K = num_classes
    t = target.long()
    ok = (t >= 0) & (t < K)
    slot = t.to(torch.int32).masked_fill_(~ok, K)  # slot K: not counted (values that wrap are not ok)
    H, W = t.shape[-2:]
    ok_padded = F.pad(ok, (1, 1, 1, 1)).view(torch.uint8)  # off the image: not valid
    slot_padded = F.pad(slot, (1, 1, 1, 1), value=K)
    near = torch.zeros_like(slot, dtype=torch.uint8)
    same = torch.zeros_like(near)
    for dy, dx in _OFFSETS[4]:
        near += ok_padded[:, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]
        same += slot_padded[:, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] == slot  # equal to a valid centre: valid
    code = (slot * 25).add_(near, alpha=5).add_(same).long().flatten()
    hist = torch.zeros((K + 1) * 25, dtype=torch.long, device=code.device).scatter_add_(0, code, torch.ones_like(code))
    counts = hist.view(K + 1, 5, 5)[:K]  # (class, valid neighbours, same neighbours)
    per = torch.arange(5, device=code.device)
    return (counts.sum(1) * per).sum(1).double(), (counts.sum(2) * per).sum(1).double()


@maybe_compiled
def padded_masked(probs, valid):
    """(B, K, H + 2, W + 2): the probabilities with 0 at invalid pixels and around the image."""
    return F.pad(probs.masked_fill(~valid[:, None], 0.0), (1, 1, 1, 1))


@maybe_compiled
def fused_indicators(probs, padded, expect, connectivity: int, margin: bool):
    """`MarginalContext.swept_indicators` for one neighbour, written for torch.compile: the
    same float32 operations per class (refinement, running top-2), functional, so inductor
    fuses the class loop into one pass over `padded` (`padded_masked`) and `probs`."""
    B, K, H, W = probs.shape
    top_p, top_q = probs[:, 0], None
    second_p = second_q = torch.full_like(top_p, -math.inf)
    for c in range(K):
        p = probs[:, c]
        views = [padded[:, c, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] for dy, dx in _OFFSETS[connectivity]]
        n = torch.maximum(views[0], views[1])
        for view in views[2:]:
            n = torch.maximum(n, view)
        q = p + BETA * n - BETA * torch.maximum(p * n, p * expect[c])
        if c == 0:
            top_q = q
            continue
        if margin:
            second_p = torch.maximum(second_p, torch.minimum(top_p, p))
            second_q = torch.maximum(second_q, torch.minimum(top_q, q))
        top_p, top_q = torch.maximum(top_p, p), torch.maximum(top_q, q)
    return (top_p - second_p, top_q - second_q) if margin else (top_p, top_q)


class MarginalContext(Selector):
    context_keys = ("progress", "labeled_target")

    def __init__(
        self,
        num_classes: int,
        keep_start: float = 60.0,
        indicator: str = "margin",
        connectivity: int = 4,
        neighbours: int = 1,
        e_joint: str | list = "labeled",
    ):
        super().__init__(num_classes)
        if not 0.0 <= keep_start <= 100.0:
            raise self._error(f"keep_start must be a percentage in [0, 100], got {keep_start}")
        if indicator not in INDICATORS:
            raise self._error(f"indicator must be one of {list(INDICATORS)}, got {indicator!r}")
        if connectivity not in _OFFSETS:
            raise self._error(f"connectivity must be 4 or 8, got {connectivity!r}")
        if not 1 <= int(neighbours) <= connectivity:
            raise self._error(f"neighbours must lie in [1, connectivity={connectivity}], got {neighbours}")
        if isinstance(e_joint, str):
            if e_joint not in ("labeled", "independent"):
                raise self._error(f"e_joint must be 'labeled', 'independent' or a list of {num_classes} values, got {e_joint!r}")
        elif len(e_joint) != num_classes or not all(0.0 <= float(e) <= 1.0 for e in e_joint):
            raise self._error(f"e_joint as a list needs {num_classes} values in [0, 1], got {e_joint!r}")
        self.keep_start, self.indicator, self.connectivity = float(keep_start), indicator, int(connectivity)
        self.neighbours = int(neighbours)
        self.e_joint = e_joint if isinstance(e_joint, str) else [float(e) for e in e_joint]
        self.same_pairs = torch.zeros(num_classes, dtype=torch.float64)
        self.all_pairs = torch.zeros(num_classes, dtype=torch.float64)
        self._given = None

    def keep_percent(self, progress: float) -> float:
        if not 0.0 <= progress <= 1.0:
            raise self._error(f"progress must lie in [0, 1], got {progress}")
        return 100.0 - (100.0 - self.keep_start) * (1.0 - progress)

    def expectation(self, device=None):
        """(K,) E_c in use."""
        if self.e_joint == "independent":
            return torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        if self.e_joint == "labeled":
            return (self.same_pairs / self.all_pairs.clamp(min=1)).to(device)
        if self._given is None or self._given.device != torch.device(device or "cpu"):
            self._given = torch.tensor(self.e_joint, dtype=torch.float64, device=device)
        return self._given  # built once per device

    def refine(self, probs, valid):
        """(B, K, H, W) refined q, the whole map at once (the entropy indicator sums it over K)."""
        expect = self.expectation(probs.device).to(probs.dtype)[None, :, None, None]
        if self.neighbours == 1:
            ranked = (neighbour_max(probs, valid, self.connectivity),)
        else:
            ranked = neighbour_values(probs, valid, self.connectivity).topk(self.neighbours, dim=0).values
        q = probs
        for n in ranked:  # largest first; a handful of neighbours, not pixels
            q = q + BETA * n - BETA * torch.maximum(q * n, q * expect)
        return q

    def swept_indicators(self, probs, valid):
        """(before, after), (B, H, W) each: the margin or confidence of the unrefined and of
        the refined probabilities, in one sweep over the class slices. Per class: the
        neighbour maximum (or top-`neighbours`) of its masked, padded slice, the refinement
        by the same float32 operations as `refine` (so q is the same numbers), and a running
        top-2 (top-1 for confidence), which is `topk(2)` / `amax` over K exactly (a max or
        min is exact in any order); nothing of size (B, K, H, W) is written. On large CPU
        batches (`maybe_compiled`'s choice) one neighbour runs as `fused_indicators`: the
        same operations compiled into one pass (inductor's C++ keeps each float operation
        rounded on its own: no contraction into FMAs, no reassociation)."""
        B, K, H, W = probs.shape
        expect = self.expectation(probs.device).to(probs.dtype)
        margin = self.indicator == "margin"
        fused = fused_indicators.for_input(probs)
        if self.neighbours == 1 and probs.device.type == "cpu" and fused is not fused_indicators.fn:  # compiled
            return fused(probs, padded_masked(probs, valid), expect, self.connectivity, margin)
        padded = probs.new_zeros(B, H + 2, W + 2)
        inner = padded[:, 1 : 1 + H, 1 : 1 + W]
        views = [padded[:, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] for dy, dx in _OFFSETS[self.connectivity]]
        invalid = ~valid
        near, step, prod, other, refined, low = (probs.new_empty(B, H, W) for _ in range(6))
        top_p, top_q = probs[:, 0].clone(), probs.new_empty(B, H, W)
        second_p, second_q = probs.new_full((B, H, W), -math.inf), probs.new_full((B, H, W), -math.inf)
        for c in range(K):
            p = probs[:, c]
            inner.copy_(p).masked_fill_(invalid, 0.0)
            if self.neighbours == 1:
                torch.maximum(views[0], views[1], out=near)
                for view in views[2:]:
                    torch.maximum(near, view, out=near)
                ranked = (near,)
            else:
                ranked = torch.stack(views).topk(self.neighbours, dim=0).values
            q = p
            for n in ranked:  # q + BETA * n - BETA * max(q * n, q * E_c), op by op as in `refine`
                torch.mul(n, BETA, out=step)
                torch.add(q, step, out=step)
                torch.mul(q, n, out=prod)
                torch.mul(q, expect[c], out=other)
                torch.maximum(prod, other, out=prod)
                prod.mul_(BETA)
                torch.sub(step, prod, out=refined)
                q = refined
            if c == 0:
                top_q.copy_(q)
                continue
            if margin:  # the second largest: the max of what each new value pushes down
                torch.minimum(top_p, p, out=low)
                torch.maximum(second_p, low, out=second_p)
                torch.minimum(top_q, q, out=low)
                torch.maximum(second_q, low, out=second_q)
            torch.maximum(top_p, p, out=top_p)
            torch.maximum(top_q, q, out=top_q)
        if margin:
            return top_p.sub_(second_p), top_q.sub_(second_q)
        return top_p, top_q

    def _select(self, probs, valid, moments, progress: float = 0.0, labeled_target=None, **context):
        if self.e_joint == "labeled" and labeled_target is not None:
            same, total = same_class_pair_counts(labeled_target, self.num_classes)
            self.same_pairs = self.same_pairs.to(same.device) + same
            self.all_pairs = self.all_pairs.to(total.device) + total
        keep = self.keep_percent(float(progress))
        if self.indicator == "entropy":
            before, after = indicator(probs, "entropy"), indicator(self.refine(probs, valid), "entropy")
        else:
            before, after = self.swept_indicators(probs, valid)
        level = keep if self.indicator == "entropy" else 100.0 - keep
        # nanquantile over the valid pixels, as numpy.percentile, without a host read
        gamma = valid_quantile(before, valid, level / 100.0, like=probs)
        kept = after.double() < gamma if self.indicator == "entropy" else after.double() > gamma
        return hard_selection(moments.label, kept, valid)

    def state_dict(self):
        return {"same_pairs": self.same_pairs.detach().cpu().clone(), "all_pairs": self.all_pairs.detach().cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for key in ("same_pairs", "all_pairs"):
            if tuple(state[key].shape) != (self.num_classes,):
                raise self._error(f"state {key} has shape {tuple(state[key].shape)}, expected ({self.num_classes},)")
        self.same_pairs = state["same_pairs"].double().clone()
        self.all_pairs = state["all_pairs"].double().clone()
