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

Precision and cost (docs/kernels.md): Pbar, v, the transport kernel, the Sinkhorn scalings
and the plan are float32; the t-test (per pixel) and the marginals stay float64. In float64
they cost 60x the bare threshold per pass at 16x21x256x256 (10 passes, one Sinkhorn
iteration; the softmax moments alone 34x), over issue 21's 10x. Float32 keeps 7 significant
digits of probabilities that decisions compare with 0.5 and with each other, and of a plan
that only ranks points: the selection differs from the float64 one only where two plan
entries, or a t statistic and its critical value, agree to float32 rounding (2 pixels of 1M
in 4 of 84 comparisons; the float64 numpy reference tests pass unchanged). On large CPU
batches the moments come from bench/contract/pass_moments.py (nothing of size M x batch
written) and the t-test, the transport kernel and the plan's argmax are compiled passes,
whose exp, pow and sqrt are inductor's: there the compiled and the eager path can differ
in the last bit, and a point at a decision's rounding edge go either way.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from bench.contract import Selector, hard_selection
from bench.contract.compiled import maybe_compiled
from bench.contract.pass_moments import softmax_moments

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
    P = float(two_tail)  # a Python number: no host-to-device copy on the training path
    return _hill(nu.double(), P, NormalDist().inv_cdf(0.5 * P))


def _hill(nu, P: float, x: float):
    """`t_quantile` given the normal quantile x at P / 2 (a number: compiled code keeps it)."""
    a = 1 / (nu - 0.5)
    b = 48 / a**2
    c = ((20700 * a / b - 98) * a - 16) * a + 96.36
    d = ((94.5 / (b + c) - 3) / b + 1) * torch.sqrt(a * math.pi / 2) * nu
    y = (d * P) ** (2 / nu)
    near = ((1 / (((nu + 6) / (nu * y) - 0.089 * d - 0.822) * (nu + 2) * 3) + 0.5 / (nu + 4)) * y - 1) * (nu + 1) / (nu + 2) + 1 / y
    c_tail = torch.where(nu < 5, c + 0.3 * (nu - 4.5) * (x + 0.6), c)
    c_tail = (((0.05 * d * x - 5) * x - 7) * x - 2) * x + b + c_tail
    z = (((((0.4 * x**2 + 6.3) * x**2 + 36) * x**2 + 94.5) / c_tail - x**2 - 3) / b + 1) * x
    tail = torch.expm1(a * z**2)
    return torch.sqrt(nu * torch.where(y > 0.05 + a, tail, near))


TWO_TAIL = 0.05  # the t-test's level: t > t_0.975(nu)
_NORMAL_AT_HALF = NormalDist().inv_cdf(0.5 * TWO_TAIL)


@maybe_compiled
def welch_confident(mean, var, valid, M: int):
    """((B, H, W) points: valid and the top-two t-test passes, (B, H, W) label = a), from the
    members' mean and variance (B, K, H, W) float32, in one sweep over the classes: a and b
    are the largest and second-largest Pbar, the first class among equals (as a stable sort
    by -Pbar), carried with their variances. The test's arithmetic runs in float64."""
    top, top_var = mean[:, 0], var[:, 0]
    label = torch.zeros_like(top, dtype=torch.long)
    second, second_var = torch.full_like(top, -math.inf), torch.zeros_like(top_var)
    for c in range(1, mean.shape[1]):
        x, x_var = mean[:, c], var[:, c]
        above, between = x > top, x > second  # strictly: an equal later class does not displace
        second_var = torch.where(above, top_var, torch.where(between, x_var, second_var))
        second = torch.where(above, top, torch.where(between, x, second))
        top_var, top, label = torch.where(above, x_var, top_var), torch.where(above, x, top), torch.where(above, c, label)
    pa, pb, va, vb = top.double(), second.double(), top_var.double(), second_var.double()
    t = (pa - pb) / torch.sqrt((0.1 + va + vb) / M)
    nu = (va + vb).square() / ((va.square() + vb.square()) / (M - 1))
    critical = _hill(nu.clamp(min=M - 1.0).nan_to_num(M - 1.0), TWO_TAIL, _NORMAL_AT_HALF)
    return (t - critical > 0) & ~torch.isnan(nu) & valid, label


@maybe_compiled
def first_argmax(mean):
    """(B, H, W): the first class of the largest Pbar."""
    K = mean.shape[1]
    k = torch.arange(K, device=mean.device).view(1, K, 1, 1)
    return torch.where(mean == mean.amax(dim=1, keepdim=True), k, K).amin(dim=1)


def smoothed_prior(counts, num_classes):
    """(K,) class prior from label counts, with the source's smoothing when max/min > 5."""
    total = counts.sum()
    w = torch.where(total > 0, counts / total.clamp(min=1e-300), torch.full_like(counts, 1.0 / num_classes))
    skewed = (w.min() <= 0) | (w.max() > 5 * w.min())
    smooth = w / w.sum() + 1.0 / num_classes
    return torch.where(skewed, smooth / smooth.sum(), w)


def per_image(per_pool, images):
    """A pool's values repeated for each of its images (pools of images // P images)."""
    return per_pool.repeat_interleave(images // per_pool.shape[0], dim=0, output_size=images)


@maybe_compiled
def transport_kernel(mean, points, eps):
    """(B, K, H * W) float32 exp(-(1 - Pbar) / eps) at the points, 0 elsewhere: the transport
    kernel, in the layout of Pbar (a pool is one image or all of them); eps (B,) per image,
    its pool's."""
    B, K = mean.shape[:2]
    return torch.exp(-(1.0 - mean.reshape(B, K, -1)) / eps[:, None, None]) * points.reshape(B, 1, -1)


def sinkhorn_scalings(G, points, pools, rho, prior, iters):
    """Scalings of the augmented transport problem: (u (B, N), v (P, K)), float32, per point
    and per pool (P pools of B // P images each).

    G (B, K, N) from `transport_kernel`, points (B, N) bool. Dummy point and dummy class
    enter as their marginals and unit kernel entries; a pool without points gets u = 0."""
    B = G.shape[0]
    n_points = points.reshape(pools, -1).sum(1).double()  # N' per pool
    r = points.float()
    r_dummy = (0.2 * rho * n_points).float()
    c = (1.1 * rho * n_points[:, None] * prior[None]).float()
    c_dummy = (n_points * (1 - 0.9 * rho)).float()
    u, u_dummy = r.clone(), torch.ones_like(r_dummy)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iters):  # iterations, not pixels: each is two batched mat-vecs
        column = torch.bmm(G, u[:, :, None]).reshape(pools, B // pools, -1).sum(1)  # sum_n G u per pool and class
        v = c / (column + u_dummy[:, None]).clamp(min=tiny)
        v_dummy = c_dummy / (u.reshape(pools, -1).sum(1) + u_dummy).clamp(min=tiny)
        row = torch.bmm(per_image(v, B)[:, None, :], G).squeeze(1)  # sum_k v G per point
        u = r / (row + per_image(v_dummy, B)[:, None]).clamp(min=tiny)
        u_dummy = r_dummy / (v.sum(1) + v_dummy).clamp(min=tiny)
    return u, v


@maybe_compiled
def plan_choice(G, u, v, mean, points):
    """Per point (B, N): the class of the largest plan entry u G v over the real classes (the
    first among equals), that entry, and whether the point is a candidate (a point whose
    Pbar of that class is above 0.5). v (B, K): the image's pool's."""
    B, K, N = G.shape
    plan = u[:, None, :] * G * v[:, :, None]
    k = torch.arange(K, device=G.device).view(1, K, 1)
    best = plan.amax(dim=1, keepdim=True)
    row_class = torch.where(plan == best, k, K).amin(dim=1, keepdim=True)
    chosen = torch.where(k == row_class, mean.reshape(B, K, N), 0.0).sum(dim=1)  # one term is not 0
    return row_class.squeeze(1), best.squeeze(1), points & (chosen > 0.5)


def capped_assignment(plan_row_class, score, candidate, cap):
    """(P,N) bool: per pool and class, the `cap[p, c]` candidates of class c with the
    largest score, the first among equal scores. One stable sort of (pool, class, score
    descending) as int64 keys (the order of two stable sorts, by score and then by class),
    then each point's rank in its group against the group's cap."""
    P, N = score.shape
    K = cap.shape[1]
    pool = torch.arange(P, device=score.device)[:, None] * (K + 1)
    group = torch.where(candidate, plan_row_class, K).add_(pool).flatten()  # class K: not a candidate
    bits = (score.float() + 0.0).view(torch.int32).long()  # + 0.0: no -0 (it would sort below +0)
    descending = 0x7FFFFFFF - (bits ^ ((bits >> 31) & 0x7FFFFFFF))  # ordered float keys, reversed, >= 0
    order = torch.sort(group.bitwise_left_shift(32).bitwise_or_(descending.flatten()), stable=True).indices
    ones = torch.ones((), dtype=torch.long, device=score.device).expand(P * N)
    counts = torch.zeros(P * (K + 1), dtype=torch.long, device=score.device).index_add_(0, group, ones)
    sorted_group = group.index_select(0, order)
    first = (counts.cumsum(0) - counts).index_select(0, sorted_group)  # where each group starts in the order
    cap_ext = torch.cat([cap, torch.zeros(P, 1, dtype=cap.dtype, device=cap.device)], 1).flatten()  # group K: none kept
    keep_sorted = torch.arange(P * N, device=score.device).sub_(first) < cap_ext.index_select(0, sorted_group)
    return torch.zeros_like(keep_sorted).scatter_(0, order, keep_sorted).view(P, N)


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
            M = mc_logits.shape[0]
            [(mean, var)], nonfinite = softmax_moments(mc_logits.float())  # the variance divides by M
            self._check(nonfinite, "mc_logits contains NaN or Inf", diverged=True)
            points, label = welch_confident.for_input(mean)(mean, var, valid, M)
        else:
            mean, points, label = probs, valid, first_argmax.for_input(probs)(probs)
        rho = self.share(float(progress))
        prior = self.prior(probs.device)
        pools = 1 if self.pool == "batch" else B
        pts = points.reshape(B, -1)
        n_points = pts.reshape(pools, -1).sum(1).double()  # N'
        per_class = n_points / K
        eps = torch.where(per_class >= 200, 0.5, torch.where(per_class >= 100, 0.2, torch.where(per_class >= 50, 0.1, 0.05)))
        G = transport_kernel.for_input(mean)(mean, points, per_image(eps, B).float())
        u, v = sinkhorn_scalings(G, pts, pools, rho, prior, self.sinkhorn_iters)
        row_class, score, candidate = plan_choice.for_input(mean)(G, u, per_image(v, B), mean, pts)
        n_pool = valid.reshape(pools, -1).sum(1).double()
        cap = torch.ceil(rho * prior[None] * n_pool[:, None]).long()
        shape = (pools, -1)
        kept = capped_assignment(row_class.reshape(shape), score.reshape(shape), candidate.reshape(shape), cap).reshape(B, H, W)
        return hard_selection(label, kept, valid)

    def state_dict(self):
        return {"label_counts": self.label_counts.detach().cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if tuple(state["label_counts"].shape) != (self.num_classes,):
            raise self._error(f"state label_counts has shape {tuple(state['label_counts'].shape)}, expected ({self.num_classes},)")
        self.label_counts = state["label_counts"].double().clone()
