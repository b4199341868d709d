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
or a sort over K; large CPU batches compile that sweep into one pass over the pixels off
the border, which reads the probabilities in place (no padded copy), and run the border
through the whole-tensor formulas. The percentile is bench/contract/quantile.py's radix
select, the number torch.nanquantile gives without sorting the batch. The selection is bit
for bit that of the whole-tensor formulas (tests/test_selectors_2024.py); entropy keeps
them (its sum over K is order-sensitive).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.contract import Selector, hard_selection
from bench.contract.compiled import maybe_compiled
from bench.contract.quantile import first_digits as _first_digits, next_digits as _next_digits, valid_quantile  # noqa: F401 (the compiled digit passes, which the tests check)

BETA = math.exp(-0.5)
INDICATORS = ("margin", "confidence", "entropy")
_OFFSETS = {4: ((-1, 0), (1, 0), (0, -1), (0, 1)), 8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))}


@maybe_compiled
def padded_masked(probs, valid):
    """(B, K, H + 2, W + 2): the probabilities with 0 at invalid pixels and around the image."""
    return F.pad(probs.masked_fill(~valid[:, None], 0.0), (1, 1, 1, 1))


def neighbour_values(probs, valid, connectivity):
    """(N, B, K, H, W): each neighbour's probabilities at every pixel, 0 off-image or invalid."""
    padded = padded_masked(probs, valid)
    H, W = probs.shape[-2:]
    return torch.stack([padded[..., 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] for dy, dx in _OFFSETS[connectivity]])


def neighbour_max(probs, valid, connectivity):
    """(B, K, H, W): `neighbour_values(...).amax(0)` as a running maximum over shifted views
    of the padded map, without the (N, B, K, H, W) stack (a max is exact in any order)."""
    padded = padded_masked(probs, valid)
    H, W = probs.shape[-2:]
    views = [padded[..., 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] for dy, dx in _OFFSETS[connectivity]]
    out = torch.maximum(views[0], views[1])
    for view in views[2:]:
        torch.maximum(out, view, out=out)
    return out


def indicator(q, kind):
    if kind == "confidence":
        return q.amax(dim=1)
    if kind == "margin":  # top-1 minus top-2, as topk(2) gives them (a tie at the top: 0), without topk's sort
        top = q.amax(dim=1, keepdim=True)
        at_top = q == top
        second = torch.where(at_top.sum(dim=1) > 1, top.squeeze(1), torch.where(at_top, -math.inf, q).amax(dim=1))
        return top.squeeze(1) - second
    return -(q * torch.log(q + 1e-10)).sum(dim=1)


@maybe_compiled
def pair_codes(target, num_classes: int):
    """(B, H, W) int64 per pixel: class * 25 + valid neighbours * 5 + same-class neighbours
    (4-connected, in the image), class K for a label outside 0..K-1 (not counted). Counted
    in int32 (inductor's int64 arithmetic is several times slower)."""
    K = num_classes
    ok = (target >= 0) & (target < K)
    slot = torch.where(ok, target, K).int()  # in range before narrowing: values that would wrap are not ok
    H, W = target.shape[-2:]
    ok_padded = F.pad(ok.int(), (1, 1, 1, 1))  # off the image: not valid
    slot_padded = F.pad(slot, (1, 1, 1, 1), value=K)
    near = same = torch.zeros_like(slot)
    for dy, dx in _OFFSETS[4]:
        near = near + ok_padded[:, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]
        same = same + (slot_padded[:, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] == slot).int()  # equal to a valid centre: valid
    return (slot * 25 + near * 5 + same).long()


def same_class_pair_counts(target, num_classes, like=None):
    """(same, total), each (K,) float64: in-image 4-neighbour pairs with both labels valid, by
    the centre's class; `same` those whose neighbour has the same class. Counted per pixel
    (how many of its 4 neighbours are valid, how many share its class: 0-4 each, `pair_codes`)
    and then per class in one histogram of (class, valid neighbours, same neighbours):
    integer counts, so the same numbers as adding the pairs one direction at a time. The
    codes are compiled when `like` (default `target`) is large enough."""
    K = num_classes
    code = pair_codes.for_input(target if like is None else like)(target.long(), K).flatten()
    ones = torch.ones((), dtype=torch.long, device=code.device).expand(code.numel())
    hist = torch.zeros((K + 1) * 25, dtype=torch.long, device=code.device).index_add_(0, code, ones)  # faster than scatter_add_ on the CPU
    counts = hist.view(K + 1, 5, 5)[:K]  # (class, valid neighbours, same neighbours)
    per = torch.arange(5, device=code.device)
    return (counts.sum(1) * per).sum(1).double(), (counts.sum(2) * per).sum(1).double()


@maybe_compiled
def fused_indicators(probs, weight, expect, connectivity: int, margin: bool):
    """`MarginalContext.swept_indicators` for one neighbour at the pixels off the border,
    (B, H - 2, W - 2) each, written functionally so that inductor compiles the class loop
    into one pass over the probabilities. Neighbours are read in place and masked as they
    are read (`weight`: valid as 0/1 floats, which inductor reads much faster than bools),
    not through a padded copy, which would cost more than the pass. A pixel's own
    probability is masked too: the same number at a valid pixel, 0 at an invalid one, whose
    indicators the selection never reads (the percentile and the kept set are over valid
    pixels)."""
    B, K, H, W = probs.shape

    def masked(c, dy, dx):  # class c's probabilities at the neighbour (dy, dx), 0 where it is invalid
        rows, cols = slice(1 + dy, H - 1 + dy), slice(1 + dx, W - 1 + dx)
        return torch.where(weight[:, rows, cols] > 0, probs[:, c, rows, cols], 0.0)

    top_p, top_q = masked(0, 0, 0), None
    second_p = second_q = torch.full_like(top_p, -math.inf)
    for c in range(K):
        p = masked(c, 0, 0)
        views = [masked(c, dy, dx) for dy, dx in _OFFSETS[connectivity]]
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
        batches (`maybe_compiled`'s choice) one neighbour runs as `fused_indicators` for the
        pixels off the border, the same operations compiled into one pass (inductor's C++
        keeps each float operation rounded on its own: no contraction into FMAs, no
        reassociation), and `_framed` adds the border."""
        B, K, H, W = probs.shape
        expect = self.expectation(probs.device).to(probs.dtype)
        margin = self.indicator == "margin"
        fused = fused_indicators.for_input(probs)
        if self.neighbours == 1 and probs.device.type == "cpu" and fused is not fused_indicators.fn and min(H, W) >= 3:  # compiled
            return self._framed(fused(probs, valid.float(), expect, self.connectivity, margin), probs, valid)
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

    def _framed(self, inner, probs, valid):
        """(before, after) of the whole image from those of the inner pixels: the border rows
        and columns from the whole-tensor formulas (`indicator` of `refine`, the same float32
        operations) on the two rows or columns along each edge, a few thousand pixels. The
        rows of both edges go as one batch, the columns (transposed: the neighbourhood is
        symmetric) as another."""
        B = probs.shape[0]

        def edges(p, v):  # the first and last two rows of each image, as 2B strips of 2 rows
            strips, strip_valid = torch.cat([p[:, :, :2], p[:, :, -2:]]), torch.cat([v[:, :2], v[:, -2:]])
            both = indicator(strips, self.indicator), indicator(self.refine(strips, strip_valid), self.indicator)
            return [(x[:B, 0], x[B:, 1]) for x in both]  # the first row of the top strips, the last of the bottom ones

        rows, cols = edges(probs, valid), edges(probs.transpose(-1, -2), valid.transpose(-1, -2))
        out = []
        for (top, bottom), (left, right), middle in zip(rows, cols, inner):
            whole = middle.new_empty(valid.shape)
            whole[:, 1:-1, 1:-1], whole[:, 0], whole[:, -1], whole[:, :, 0], whole[:, :, -1] = middle, top, bottom, left, right
            out.append(whole)
        return tuple(out)

    def _select(self, probs, valid, moments, progress: float = 0.0, labeled_target=None, **context):
        if self.e_joint == "labeled" and labeled_target is not None:
            same, total = same_class_pair_counts(labeled_target, self.num_classes, like=probs)
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
