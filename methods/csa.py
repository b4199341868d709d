"""Confident Sinkhorn Allocation (Nguyen et al., ICML 2023) adapted to pixels.

From the paper and the authors' code (amzn/confident-sinkhorn-allocation) [C]:
- confidence by Welch's t-test between the top two classes of the ensemble mean Pbar over
  M members: t = (Pbar_a - Pbar_b) / sqrt((0.1 + v_a + v_b) / M), v the variance over members
  (dividing by M), nu = (v_a + v_b)^2 / ((v_a^2 + v_b^2) / (M - 1)); a point takes part when
  t > t_0.975(nu) (nu undefined, 0/0: it does not);
- entropic optimal transport of the N' confident points to the K classes plus a dummy point
  and a dummy class: cost 1 - Pbar (0 for the dummies), kernel exp(-cost / eps), row
  marginals 1 (dummy point 0.2 rho N'), column marginals 1.1 rho N' w_k (dummy class
  N' (1 - 0.9 rho)); eps 0.5 / 0.2 / 0.1 / 0.05 as N'/K >= 200 / 100 / 50 / below; 100
  Sinkhorn iterations from u = 1 (v = c / G^T u; u = r / G v), no convergence test;
- assignment: each point's class is the argmax of its row of the plan over the real classes;
  per class c the points with Pbar_c > 0.5, ranked by their plan entry, the first
  ceil(rho w_c N_pool) kept, label c, weight 1;
- class prior w: label frequencies of the labelled set, normalised; when max/min > 5,
  w <- w / sum(w) + 1/K, normalised again (an unseen class makes the ratio infinite).

Ours [A]: the ensemble is `passes` stochastic teacher passes (context `mc_logits`, MC dropout,
charged to the budget like UPS; M = passes); with passes = 0 every valid pixel takes part and
Pbar = probs (the source's SLA mode, no t-test). Points are the valid pixels of a pool: the
whole batch (default: the closest a step gets to the source's dataset-level allocation, since
one image's class mix is far from the dataset's) or each image (`pool="image"`); N_pool is
the pool's valid pixels. rho follows the source's 5 rounds as the cumulative labelled share
at this point of training (0.333, 0.511, 0.609, 0.661, 0.684 over `progress`), or is a
constant. The class prior is given (`class_prior`) or accumulated from the labelled
batches' pixel labels (context `labeled_target`, kept in the state dict; uniform before any
is seen). The label is argmax Pbar wherever a pixel is kept (Pbar_c > 0.5 forces it).
t_0.975(nu) uses Hill's approximation (CACM algorithm 396), within 1e-5 of the exact
quantile from nu = 3, which passes >= 4 guarantees (nu >= M - 1).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from bench.contract import Selector, hard_selection

ROUNDS = 5
POOLS = ("batch", "image")


def round_shares(rounds: int = ROUNDS) -> list[float]:
    """Share of the remaining pool the source labels in round t: 2 (T - t) / (T (T + 1))."""
    return [2 * (rounds - t) / (rounds * (rounds + 1)) for t in range(rounds)]


def cumulative_rho(progress: float, rounds: int = ROUNDS) -> float:
    """The share labelled after round floor(progress * T): 1 - prod_{i <= t} (1 - f_i)."""
    t = min(int(progress * rounds), rounds - 1)
    remaining = 1.0
    for f in round_shares(rounds)[: t + 1]:
        remaining *= 1.0 - f
    return 1.0 - remaining


def t_quantile(two_tail: float, nu):
    """Student-t quantile t with P(|T| > t) = two_tail, for real nu > 2 (Hill 1970, alg. 396)."""
    nu = nu.double()
    P = float(two_tail)  # a Python number: no host-to-device copy on the training path
    a = 1 / (nu - 0.5)
    b = 48 / a**2
    c = ((20700 * a / b - 98) * a - 16) * a + 96.36
    d = ((94.5 / (b + c) - 3) / b + 1) * torch.sqrt(a * math.pi / 2) * nu
    y = (d * P) ** (2 / nu)
    near = ((1 / (((nu + 6) / (nu * y) - 0.089 * d - 0.822) * (nu + 2) * 3) + 0.5 / (nu + 4)) * y - 1) * (nu + 1) / (nu + 2) + 1 / y
    x = NormalDist().inv_cdf(0.5 * P)
    c_tail = torch.where(nu < 5, c + 0.3 * (nu - 4.5) * (x + 0.6), c)
    c_tail = (((0.05 * d * x - 5) * x - 7) * x - 2) * x + b + c_tail
    z = (((((0.4 * x**2 + 6.3) * x**2 + 36) * x**2 + 94.5) / c_tail - x**2 - 3) / b + 1) * x
    tail = torch.expm1(a * z**2)
    return torch.sqrt(nu * torch.where(y > 0.05 + a, tail, near))


def member_moments(mc_logits):
    """Mean and variance (dividing by M) over the M passes of their softmax, in float64,
    one pass at a time (never M float64 copies of the batch)."""
    M = mc_logits.shape[0]
    mean = sum(z.double().softmax(dim=1) for z in mc_logits) / M
    var = sum((z.double().softmax(dim=1) - mean).square() for z in mc_logits) / M
    return mean, var


def welch_confident(mean, var, M):
    """(B,H,W) bool: the top-two t-test passes, from the members' mean and variance (B,K,H,W)."""
    top, which = mean.topk(2, dim=1)
    va, vb = var.gather(1, which).unbind(1)
    t = (top[:, 0] - top[:, 1]) / torch.sqrt((0.1 + va + vb) / M)
    nu = (va + vb).square() / ((va.square() + vb.square()) / (M - 1))
    critical = t_quantile(0.05, nu.clamp(min=M - 1.0).nan_to_num(M - 1.0))
    return (t - critical > 0) & ~torch.isnan(nu)


def smoothed_prior(counts, num_classes):
    """(K,) class prior from label counts, with the source's smoothing when max/min > 5."""
    total = counts.sum()
    w = torch.where(total > 0, counts / total.clamp(min=1e-300), torch.full_like(counts, 1.0 / num_classes))
    skewed = (w.min() <= 0) | (w.max() > 5 * w.min())
    smooth = w / w.sum() + 1.0 / num_classes
    return torch.where(skewed, smooth / smooth.sum(), w)


def sinkhorn_plan_factors(mean, points, rho, prior, iters):
    """Scalings of the augmented transport problem, per pool: (u (P,N), v (P,K), G (P,N,K)).

    mean (P,N,K) float64, points (P,N) bool. Dummy point and dummy class enter as
    their marginals and unit kernel entries; a pool without points gets u = 0."""
    P_, N, K = mean.shape
    n_points = points.sum(1).double()  # N'
    per_class = n_points / K
    eps = torch.where(per_class >= 200, 0.5, torch.where(per_class >= 100, 0.2, torch.where(per_class >= 50, 0.1, 0.05)))
    G = torch.exp(-(1.0 - mean) / eps[:, None, None]) * points[..., None]
    r = points.double()
    r_dummy = 0.2 * rho * n_points
    c = 1.1 * rho * n_points[:, None] * prior[None]
    c_dummy = n_points * (1 - 0.9 * rho)
    u, u_dummy = r.clone(), torch.ones_like(n_points)
    tiny = 1e-300
    for _ in range(iters):  # iterations, not pixels: each is two batched mat-vecs
        v = c / (torch.einsum("pn,pnk->pk", u, G) + u_dummy[:, None]).clamp(min=tiny)
        v_dummy = c_dummy / (u.sum(1) + u_dummy).clamp(min=tiny)
        u = r / (torch.einsum("pnk,pk->pn", G, v) + v_dummy[:, None]).clamp(min=tiny)
        u_dummy = r_dummy / (v.sum(1) + v_dummy).clamp(min=tiny)
    return u, v, G


def capped_assignment(plan_row_class, score, candidate, cap):
    """(P,N) bool: per pool and class, the `cap[p, c]` candidates of class c with the
    largest score (two stable sorts: by score, then by class; no per-class loop)."""
    P_, N = score.shape
    K = cap.shape[1]
    cls = plan_row_class.masked_fill(~candidate, K)
    by_score = torch.sort(score.masked_fill(~candidate, -math.inf), dim=1, descending=True, stable=True).indices
    by_class = torch.sort(cls.gather(1, by_score), dim=1, stable=True).indices
    order = by_score.gather(1, by_class)
    sorted_cls = cls.gather(1, order)
    counts = torch.zeros(P_, K + 1, dtype=torch.long, device=score.device).scatter_add_(1, cls, torch.ones_like(cls))
    start = torch.cumsum(counts, 1) - counts
    rank = torch.arange(N, device=score.device)[None] - start.gather(1, sorted_cls)
    cap_ext = torch.cat([cap, torch.zeros(P_, 1, dtype=cap.dtype, device=cap.device)], 1)
    keep_sorted = (sorted_cls < K) & (rank < cap_ext.gather(1, sorted_cls))
    return torch.zeros_like(candidate).scatter(1, order, keep_sorted)


class ConfidentSinkhorn(Selector):
    context_keys = ("mc_logits", "labeled_target", "progress")

    def __init__(
        self,
        num_classes: int,
        passes: int = 10,
        pool: str = "batch",
        rho: str | float = "cumulative",
        sinkhorn_iters: int = 100,
        class_prior: list | None = None,
    ):
        super().__init__(num_classes)
        if passes != 0 and passes < 4:
            raise self._error(f"passes must be 0 (no t-test) or >= 4, got {passes}")
        if pool not in POOLS:
            raise self._error(f"pool must be one of {list(POOLS)}, got {pool!r}")
        if rho != "cumulative" and not (isinstance(rho, (int, float)) and 0.0 < float(rho) <= 1.0):
            raise self._error(f"rho must be 'cumulative' or a share in (0, 1], got {rho!r}")
        if sinkhorn_iters < 1:
            raise self._error(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        if class_prior is not None and (len(class_prior) != num_classes or min(class_prior) < 0 or sum(class_prior) <= 0):
            raise self._error(f"class_prior needs {num_classes} non-negative values with a positive sum, got {class_prior!r}")
        self.passes, self.pool, self.sinkhorn_iters = int(passes), pool, int(sinkhorn_iters)
        self.rho = rho if rho == "cumulative" else float(rho)
        self.class_prior = None if class_prior is None else [float(w) for w in class_prior]
        self.mc_passes = self.passes
        self.required_context = ("mc_logits",) if self.passes else ()
        self.label_counts = torch.zeros(num_classes, dtype=torch.float64)
        self._given_prior = None

    def share(self, progress: float) -> float:
        if not 0.0 <= progress <= 1.0:
            raise self._error(f"progress must lie in [0, 1], got {progress}")
        return cumulative_rho(progress) if self.rho == "cumulative" else self.rho

    def prior(self, device=None):
        if self.class_prior is None:
            return smoothed_prior(self.label_counts.to(device), self.num_classes)
        if self._given_prior is None or self._given_prior.device != torch.device(device or "cpu"):
            self._given_prior = smoothed_prior(torch.tensor(self.class_prior, dtype=torch.float64, device=device), self.num_classes)
        return self._given_prior  # built once per device

    def _select(self, probs, valid, moments, mc_logits=None, labeled_target=None, progress: float = 0.0, **context):
        B, K, H, W = probs.shape
        if self.class_prior is None and labeled_target is not None:
            slot = labeled_target.long().clamp(min=0).masked_fill((labeled_target < 0) | (labeled_target >= K), K).flatten()
            counts = torch.zeros(K + 1, dtype=torch.float64, device=slot.device).index_add_(0, slot, torch.ones_like(slot, dtype=torch.float64))
            self.label_counts = self.label_counts.to(slot.device) + counts[:K]
        if self.passes:
            expected = (B, K, H, W)
            if mc_logits.dim() != 5 or tuple(mc_logits.shape[1:]) != expected:
                raise self._error(f"mc_logits must have shape (T, B, K, H, W) with (B, K, H, W) = {expected}, got {tuple(mc_logits.shape)}")
            if mc_logits.shape[0] < 4:
                raise self._error(f"mc_logits needs T >= 4 passes, got T={mc_logits.shape[0]}")
            self._check(~torch.isfinite(mc_logits).all(), "mc_logits contains NaN or Inf", diverged=True)
            mean, var = member_moments(mc_logits)
            points = welch_confident(mean, var, mc_logits.shape[0]) & valid
        else:
            mean, points = probs.double(), valid
        rho = self.share(float(progress))
        prior = self.prior(probs.device)
        pools = 1 if self.pool == "batch" else B
        flat = mean.permute(0, 2, 3, 1).reshape(pools, -1, K)  # (P, N, K)
        pts = points.reshape(pools, -1)
        u, v, G = sinkhorn_plan_factors(flat, pts, rho, prior, self.sinkhorn_iters)
        plan = u[..., None] * G * v[:, None, :]
        row_class = plan.argmax(dim=2)
        score = plan.gather(2, row_class[..., None]).squeeze(2)
        candidate = pts & (flat.gather(2, row_class[..., None]).squeeze(2) > 0.5)
        n_pool = valid.reshape(pools, -1).sum(1).double()
        cap = torch.ceil(rho * prior[None] * n_pool[:, None]).long()
        kept = capped_assignment(row_class, score, candidate, cap).reshape(B, H, W)
        return hard_selection(mean.argmax(dim=1), kept, valid)

    def state_dict(self):
        return {"label_counts": self.label_counts.detach().cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if tuple(state["label_counts"].shape) != (self.num_classes,):
            raise self._error(f"state label_counts has shape {tuple(state['label_counts'].shape)}, expected ({self.num_classes},)")
        self.label_counts = state["label_counts"].double().clone()
