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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.contract import Selector, hard_selection

BETA = math.exp(-0.5)
INDICATORS = ("margin", "confidence", "entropy")
_OFFSETS = {4: ((-1, 0), (1, 0), (0, -1), (0, 1)), 8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))}


def neighbour_values(probs, valid, connectivity):
    """(N, B, K, H, W): each neighbour's probabilities at every pixel, 0 off-image or invalid."""
    p = probs.masked_fill(~valid[:, None], 0.0)
    padded = F.pad(p, (1, 1, 1, 1))
    H, W = probs.shape[-2:]
    return torch.stack([padded[..., 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] for dy, dx in _OFFSETS[connectivity]])


def indicator(q, kind):
    if kind == "confidence":
        return q.amax(dim=1)
    if kind == "margin":
        top2 = q.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    return -(q * torch.log(q + 1e-10)).sum(dim=1)


def same_class_pair_counts(target, num_classes):
    """(same, total), each (K,): in-image 4-neighbour pairs with both labels valid, by the
    centre's class; `same` those whose neighbour has the same class."""
    same = torch.zeros(num_classes + 1, dtype=torch.float64, device=target.device)
    total = torch.zeros_like(same)
    t = target.long()
    for centre, other in ((t[:, 1:], t[:, :-1]), (t[:, :-1], t[:, 1:]), (t[:, :, 1:], t[:, :, :-1]), (t[:, :, :-1], t[:, :, 1:])):
        both = (centre < num_classes) & (other < num_classes) & (centre >= 0) & (other >= 0)
        slot = centre.masked_fill(~both, num_classes).flatten()  # slot K: pairs not counted
        total.index_add_(0, slot, torch.ones_like(slot, dtype=torch.float64))
        same.index_add_(0, slot, (both & (centre == other)).flatten().double())
    return same[:num_classes], total[:num_classes]


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
        expect = self.expectation(probs.device).to(probs.dtype)[None, :, None, None]
        near = neighbour_values(probs, valid, self.connectivity)
        ranked = near.topk(self.neighbours, dim=0).values if self.neighbours > 1 else near.amax(dim=0, keepdim=True)
        q = probs
        for n in ranked:  # largest first; a handful of neighbours, not pixels
            q = q + BETA * n - BETA * torch.maximum(q * n, q * expect)
        return q

    def _select(self, probs, valid, moments, progress: float = 0.0, labeled_target=None, **context):
        if self.e_joint == "labeled" and labeled_target is not None:
            same, total = same_class_pair_counts(labeled_target, self.num_classes)
            self.same_pairs = self.same_pairs.to(same.device) + same
            self.all_pairs = self.all_pairs.to(total.device) + total
        keep = self.keep_percent(float(progress))
        q = self.refine(probs, valid)
        before, after = indicator(probs, self.indicator), indicator(q, self.indicator)
        level = keep if self.indicator == "entropy" else 100.0 - keep
        # nanquantile over the valid pixels, as numpy.percentile, without a host read
        gamma = torch.nanquantile(before.double().masked_fill(~valid, math.nan).flatten(), level / 100.0)
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
