"""The 2024+ selectors (SELECTORS-2024.md) against naive float64 references written here:
loops over images, pixels, classes and neighbours; numpy percentiles; scipy's t quantile;
a dense Sinkhorn with the dummy row and column written out as the source does."""

import math
import shutil

import numpy as np
import pytest
import torch
from scipy import stats

from bench.contract import get_selector
from methods.csa import cumulative_rho, t_quantile

IGNORE = 255


def batch(B=3, K=5, H=6, W=5, scale=3.0, seed=0, p_valid=0.8, dtype=torch.float32):
    """Random probabilities; image 0 all invalid when B > 2 (unless p_valid = 1); valid masks differ per image."""
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(B, K, H, W, generator=g, dtype=torch.float64) * scale).softmax(1)
    valid = torch.rand(B, H, W, generator=g) < p_valid
    if B > 2 and p_valid < 1:
        valid[0] = False
    return probs.to(dtype), valid


CASES = [dict(B=3, K=5, H=6, W=5), dict(B=2, K=2, H=4, W=7), dict(B=4, K=3, H=1, W=1), dict(B=3, K=4, H=5, W=5, p_valid=1.0)]
CASE_IDS = ["K5", "K2", "single-pixel", "all-valid"]


# ---------------------------------------------------------------- SemiVL
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_semivl_weights_are_the_image_ratio_and_mean(case, dtype):
    probs, valid = batch(**case, dtype=dtype)
    P, V = probs.double().numpy(), valid.numpy()
    ratio = get_selector("semivl_ratio", num_classes=P.shape[1], tau=0.8).select(probs, valid)
    avg = get_selector("semivl_avg", num_classes=P.shape[1]).select(probs, valid)
    for b in range(P.shape[0]):
        confs = [P[b, :, i, j].max() for i in range(P.shape[2]) for j in range(P.shape[3]) if V[b, i, j]]
        r = sum(c >= 0.8 for c in confs) / len(confs) if confs else 0.0
        a = sum(confs) / len(confs) if confs else 0.0
        for i in range(P.shape[2]):
            for j in range(P.shape[3]):
                assert ratio.weight[b, i, j].item() == pytest.approx(r if V[b, i, j] else 0.0, abs=1e-6)
                assert avg.weight[b, i, j].item() == pytest.approx(a if V[b, i, j] else 0.0, abs=1e-5)
                assert bool(ratio.reliable[b, i, j]) == (V[b, i, j] and r > 0)  # no gate: every weighted pixel
    assert torch.equal(ratio.label, probs.argmax(1))


# ---------------------------------------------------------------- CorrMatch
def corrmatch_reference(batches, tau0, m):
    tau, out = tau0, []
    for probs, valid in batches:
        P, V = probs.double().numpy(), valid.numpy()
        best = {}
        for b, i, j in zip(*np.nonzero(V)):
            k = int(P[b, :, i, j].argmax())
            best[k] = max(best.get(k, -1.0), P[b, :, i, j].max())
        if best:
            tau = m * tau + (1 - m) * sum(best.values()) / len(best)
        out.append((tau, (P.max(1) >= np.float32(tau)) & V))
    return out


def test_corrmatch_threshold_sequence_matches_reference():
    K = 4
    batches = [batch(B=2, K=K, seed=s, scale=2.5) for s in range(6)]
    batches[2][1][:] = False  # nothing valid: no update
    sel = get_selector("corrmatch", num_classes=K, tau_init=0.5, momentum=0.6)
    for (probs, valid), (tau, keep) in zip(batches, corrmatch_reference(batches, 0.5, 0.6)):
        out = sel.select(probs, valid)
        assert sel.tau.item() == pytest.approx(tau, abs=1e-12)
        assert np.array_equal(out.reliable.numpy(), keep) and torch.equal(out.weight, out.reliable.float())


# ---------------------------------------------------------------- CW-BASS
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("use_decay,gamma", [(False, 1.0), (True, 2.0)])
def test_cwbass_gate_and_weights_match_reference(case, use_decay, gamma):
    probs, valid = batch(**case, scale=1.0, dtype=torch.float64)
    P, V = probs.numpy(), valid.numpy()
    sel = get_selector("cwbass", num_classes=P.shape[1], use_decay=use_decay, gamma=gamma, base=0.9, beta=3.0)
    out = sel.select(probs, valid)
    C = P.max(1)
    mean = C[V].mean() if V.any() else 0.0
    tau = min(max(0.9 / (1 + math.exp(-3.0 * (mean - 0.5))), 0.3), 0.8)
    assert sel.tau.item() == pytest.approx(tau, abs=1e-6)  # C is float32 inside select
    for b, i, j in np.ndindex(*V.shape):
        gated = bool(V[b, i, j] and C[b, i, j] > tau)
        w = ((0.9 if use_decay else 1.0) * C[b, i, j]) ** gamma if gated else 0.0
        assert out.weight[b, i, j].item() == pytest.approx(w, abs=1e-5)
        assert bool(out.reliable[b, i, j]) == gated


def test_cwbass_threshold_stays_within_its_bounds():
    sel = get_selector("cwbass", num_classes=21)
    for m in (1 / 21, 0.5, 1.0):
        assert 0.3 <= sel.threshold(torch.tensor(m, dtype=torch.float64)).item() <= 0.34


# ---------------------------------------------------------------- S4MC
def s4mc_reference(P, V, target, progress, keep_start=60.0, kind="margin", connectivity=4, k=1, e_joint="labeled"):
    B, K, H, W = P.shape
    if e_joint == "labeled":
        same, total = np.zeros(K), np.zeros(K)
        for b, i, j in np.ndindex(B, H, W):
            c = target[b, i, j]
            if c >= K:
                continue
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                y, x = i + di, j + dj
                if 0 <= y < H and 0 <= x < W and target[b, y, x] < K:
                    total[c] += 1
                    same[c] += target[b, y, x] == c
        E = np.where(total > 0, same / np.maximum(total, 1), 0.0)
    elif e_joint == "independent":
        E = np.zeros(K)
    else:
        E = np.array(e_joint)
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if connectivity == 8 else [])
    beta = math.exp(-0.5)

    def score(p):
        s = np.sort(p)[::-1]
        return {"margin": s[0] - s[1], "confidence": s[0], "entropy": -(p * np.log(p + 1e-10)).sum()}[kind]

    before, after = np.zeros((B, H, W)), np.zeros((B, H, W))
    for b, i, j in np.ndindex(B, H, W):
        q = P[b, :, i, j].copy()
        for c in range(K):
            near = []
            for di, dj in offsets:
                y, x = i + di, j + dj
                near.append(P[b, c, y, x] if 0 <= y < H and 0 <= x < W and V[b, y, x] else 0.0)
            for n in sorted(near, reverse=True)[:k]:
                q[c] = q[c] + beta * n - beta * max(q[c] * n, q[c] * E[c])
        before[b, i, j], after[b, i, j] = score(P[b, :, i, j]), score(q)
    keep = 100 - (100 - keep_start) * (1 - progress)
    if not V.any():
        return np.zeros_like(V)
    if kind == "entropy":
        return (after < np.percentile(before[V], keep)) & V
    return (after > np.percentile(before[V], 100 - keep)) & V


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind,connectivity,k,e_joint", [
    ("margin", 4, 1, "labeled"), ("confidence", 8, 2, "independent"), ("entropy", 4, 1, "given")])
def test_s4mc_matches_the_naive_refinement(case, kind, connectivity, k, e_joint):
    probs, valid = batch(**case, scale=2.0, dtype=torch.float64)
    B, K, H, W = probs.shape
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, K, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < 0.2] = IGNORE
    e = [0.9 - 0.1 * c for c in range(K)] if e_joint == "given" else e_joint
    sel = get_selector("s4mc", num_classes=K, indicator=kind, connectivity=connectivity, neighbours=k, e_joint=e)
    out = sel.select(probs, valid, progress=0.3, labeled_target=target)
    expected = s4mc_reference(probs.numpy(), valid.numpy(), target.numpy(), 0.3, kind=kind, connectivity=connectivity, k=k, e_joint=e)
    assert np.array_equal(out.reliable.numpy(), expected)
    assert torch.equal(out.label, probs.argmax(1))


def test_s4mc_learns_e_from_the_labelled_pairs_and_keeps_it_in_its_state():
    probs, valid = batch(B=2, K=3, H=16, W=16, p_valid=1.0)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, :, 8:] = 1  # two halves; class 2 never seen
    sel = get_selector("s4mc", num_classes=3)
    sel.select(probs, valid, progress=0.0, labeled_target=target)
    # class-0 centres: 8 x 15 x 2 vertical + 16 x 7 x 2 horizontal same-class pairs, 16 across
    E = sel.expectation()
    assert E[0].item() == pytest.approx(464 / 480) and E[1].item() == pytest.approx(464 / 480) and E[2] == 0
    sel.select(probs, valid, progress=0.0, labeled_target=target.flip(-1))  # counts add up
    again = get_selector("s4mc", num_classes=3)
    again.load_state_dict(sel.state_dict())
    assert torch.equal(again.expectation(), E) and again.all_pairs[0].item() == 2 * 2 * 480


# The formulas of the first (unfused) S4MC implementation, written out with whole-tensor
# torch ops: the stack of neighbour maps, topk / amax over it, the refinement over
# (B, K, H, W), topk over K for the margin, and torch.nanquantile over float64. The shipped
# selector (one sweep over the class slices or one compiled pass, a radix select for the
# quantile, per-pixel pair counts) must give the same selection bit for bit.
_S4MC_OFFSETS = {4: ((-1, 0), (1, 0), (0, -1), (0, 1)), 8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))}


def s4mc_formula_pairs(target, K):
    same, total = torch.zeros(K + 1, dtype=torch.float64), torch.zeros(K + 1, dtype=torch.float64)
    t = target.long()
    for centre, other in ((t[:, 1:], t[:, :-1]), (t[:, :-1], t[:, 1:]), (t[:, :, 1:], t[:, :, :-1]), (t[:, :, :-1], t[:, :, 1:])):
        both = (centre < K) & (other < K) & (centre >= 0) & (other >= 0)
        slot = centre.masked_fill(~both, K).flatten()
        total.index_add_(0, slot, torch.ones_like(slot, dtype=torch.float64))
        same.index_add_(0, slot, (both & (centre == other)).flatten().double())
    return same[:K], total[:K]


def s4mc_formula_indicator(q, kind):
    if kind == "confidence":
        return q.amax(dim=1)
    if kind == "margin":
        top2 = q.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    return -(q * torch.log(q + 1e-10)).sum(dim=1)


def s4mc_formula(probs, valid, expect, progress, kind, connectivity, k, keep_start=60.0):
    """(reliable, label) from float32 probs and float64 E (K,)."""
    H, W = probs.shape[-2:]
    padded = torch.nn.functional.pad(probs.masked_fill(~valid[:, None], 0.0), (1, 1, 1, 1))
    near = torch.stack([padded[..., 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] for dy, dx in _S4MC_OFFSETS[connectivity]])
    ranked = near.topk(k, dim=0).values if k > 1 else near.amax(dim=0, keepdim=True)
    e = expect.to(probs.dtype)[None, :, None, None]
    q = probs
    for n in ranked:
        q = q + math.exp(-0.5) * n - math.exp(-0.5) * torch.maximum(q * n, q * e)
    before, after = s4mc_formula_indicator(probs, kind), s4mc_formula_indicator(q, kind)
    keep = 100.0 - (100.0 - keep_start) * (1.0 - progress)
    level = keep if kind == "entropy" else 100.0 - keep
    gamma = torch.nanquantile(before.double().masked_fill(~valid, math.nan).flatten(), level / 100.0)
    kept = after.double() < gamma if kind == "entropy" else after.double() > gamma
    return kept & valid, probs.argmax(1)


def s4mc_random_batches(K, seed):
    """Random batches with invalid pixels (an image all invalid, one all valid), sharp and
    flat, some with tied probabilities (so tied maxima and tied quantile values)."""
    g = torch.Generator().manual_seed(seed)
    for i, (B, H, W, scale) in enumerate([(3, 9, 11, 3.0), (2, 1, 7, 0.5), (4, 6, 6, 8.0), (1, 13, 5, 1.5)]):
        probs = (torch.randn(B, K, H, W, generator=g, dtype=torch.float64) * scale).softmax(1)
        if i % 2 == 0:  # ties: probabilities on a grid of eighths, renormalised
            probs = (probs * 8).round()
            probs = probs / probs.sum(1, keepdim=True)
        valid = torch.rand(B, H, W, generator=g) < 0.7
        if B > 2:
            valid[0], valid[1] = False, True
        target = torch.randint(-1, K + 1, (B, H, W), generator=g)  # -1 and K: not classes
        target[torch.rand(B, H, W, generator=g) < 0.2] = IGNORE
        yield probs.float(), valid, target, float(torch.rand(1, generator=g))


@pytest.mark.parametrize("kind", ["margin", "confidence", "entropy"])
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("e_joint", ["labeled", "independent", "given"])
def test_s4mc_selection_is_bit_identical_to_the_formula(kind, connectivity, k, e_joint):
    K = 5
    e = [0.95, 0.1, 0.5, 0.0, 0.7] if e_joint == "given" else e_joint
    sel = get_selector("s4mc", num_classes=K, indicator=kind, connectivity=connectivity, neighbours=k, e_joint=e)
    same, total = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    for step, (probs, valid, target, progress) in enumerate(s4mc_random_batches(K, seed=connectivity * 10 + k)):
        out = sel.select(probs, valid, progress=progress, labeled_target=target)
        if e_joint == "labeled":  # E from every labelled batch so far, this one included
            s, t = s4mc_formula_pairs(target, K)
            same, total = same + s, total + t
            expect = same / total.clamp(min=1)
        else:
            expect = torch.zeros(K, dtype=torch.float64) if e_joint == "independent" else torch.tensor(e, dtype=torch.float64)
        reliable, label = s4mc_formula(probs, valid, expect, progress, kind, connectivity, k)
        assert torch.equal(out.reliable, reliable), (step, int((out.reliable != reliable).sum()))
        assert torch.equal(out.weight, reliable.float()) and torch.equal(out.label, label)
        if e_joint == "labeled":
            assert torch.equal(sel.same_pairs, same) and torch.equal(sel.all_pairs, total)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("kind,connectivity", [("margin", 4), ("confidence", 8)])
def test_s4mc_compiled_pass_is_bit_identical_to_the_formula(monkeypatch, kind, connectivity):
    """Large CPU batches run the refinement as one compiled pass and the quantile's digit
    passes compiled (CSLBENCH_KERNELS=auto from 2**22 probabilities): the selection must not
    change."""
    from methods import s4mc

    monkeypatch.setenv("CSLBENCH_KERNELS", "compile")
    K = 6
    sel = get_selector("s4mc", num_classes=K, indicator=kind, connectivity=connectivity, e_joint=[0.9, 0.0, 0.3, 0.5, 0.7, 1.0])
    for probs, valid, target, progress in list(s4mc_random_batches(K, seed=7))[:2]:
        out = sel.select(probs, valid, progress=progress, labeled_target=target)
        reliable, label = s4mc_formula(probs, valid, sel.expectation(), progress, kind, connectivity, 1)
        assert torch.equal(out.reliable, reliable) and torch.equal(out.label, label)
        assert torch.equal(torch.stack(s4mc.same_class_pair_counts(target, K)), torch.stack(s4mc_formula_pairs(target, K)))
    assert not any(f.failed for f in (s4mc.fused_indicators, s4mc.padded_masked, s4mc._first_digits, s4mc._next_digits))  # it compiled


def test_s4mc_quantile_is_torch_nanquantile_bit_for_bit():
    """The radix select gives torch.nanquantile's number exactly: ties, NaN (ignored, as
    nanquantile does), infinities, signed zeros, subnormals, one value, no valid value."""
    from methods.s4mc import valid_quantile

    g = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, 1e-45, -1e-45, math.nan, 0.5])
    for i in range(400):
        n = int(torch.randint(1, 300, (1,), generator=g))
        values = [
            torch.rand(n, generator=g),
            (torch.rand(n, generator=g) * 4).round() / 4,
            torch.randn(n, generator=g) * 1e30,
            specials[torch.randint(0, len(specials), (n,), generator=g)],
            torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).int().view(torch.float32),  # any bits
            ((torch.randint(0, 2**17, (n,), generator=g, dtype=torch.int64) | 0x3F000000).int().view(torch.float32)),  # across a 16-bit edge
        ][i % 6].reshape(1, 1, n)
        valid = torch.rand(1, 1, n, generator=g) < [1.0, 0.7, 0.05, 0.0][i % 4]
        for fraction in (0.0, 1.0, float(torch.rand(1, generator=g))):
            expected = torch.nanquantile(values.double().masked_fill(~valid, math.nan).flatten(), fraction)
            got = valid_quantile(values, valid, fraction)
            assert (expected.isnan() and got.isnan()) or got == expected, (i, fraction, got, expected)


# ---------------------------------------------------------------- CSA
def test_t_quantile_matches_scipy_from_three_degrees_of_freedom():
    nu = torch.linspace(3.0, 60.0, 500, dtype=torch.float64)
    ours = t_quantile(0.05, nu).numpy()
    assert np.allclose(ours, stats.t.ppf(0.975, nu.numpy()), rtol=1e-5)


def test_cumulative_share_follows_the_five_rounds():
    shares = [cumulative_rho(p) for p in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    assert shares == pytest.approx([1 / 3, 1 - (2 / 3) * (11 / 15), 0.6089, 0.6610, 0.6836, 0.6836], abs=1e-4)


def csa_reference(mean, points, valid, rho, w, iters=100):
    """One pool, dense, as the source: (N,K) Pbar, point mask (N,), valid (N,)."""
    N, K = mean.shape
    idx = np.nonzero(points)[0]
    n = len(idx)
    keep = np.zeros(N, dtype=bool)
    if n == 0:
        return keep
    eps = 0.5 if n / K >= 200 else 0.2 if n / K >= 100 else 0.1 if n / K >= 50 else 0.05
    cost = np.zeros((n + 1, K + 1))
    cost[:n, :K] = 1 - mean[idx]
    G = np.exp(-cost / eps)
    r = np.concatenate([np.ones(n), [n * rho * (1.1 * w.sum() - 0.9 * w.sum())]])
    c = np.concatenate([rho * n * 1.1 * w, [n * (1 - rho * 0.9 * w.sum())]])
    u = np.ones(n + 1)
    for _ in range(iters):
        v = c / (G.T @ u)
        u = r / (G @ v)
    Q = (u[:, None] * G * v[None])[:n, :K]
    n_pool = valid.sum()
    for cls in range(K):
        members = [t for t in range(n) if Q[t].argmax() == cls and mean[idx[t], cls] > 0.5]
        members.sort(key=lambda t: -Q[t, cls])
        for t in members[: math.ceil(rho * w[cls] * n_pool)]:
            keep[idx[t]] = True
    return keep


def welch_reference(members):
    """members (M, K) -> passes the source's t-test."""
    M = members.shape[0]
    mean, var = members.mean(0), members.var(0)
    a, b = np.argsort(-mean, kind="stable")[:2]
    t = (mean[a] - mean[b]) / math.sqrt((0.1 + var[a] + var[b]) / M)
    den = (var[a] ** 2 + var[b] ** 2) / (M - 1)
    if den == 0:
        return False
    nu = (var[a] + var[b]) ** 2 / den
    return t - stats.t.ppf(0.975, nu) > 0


def prior_reference(counts, K):
    w = counts / counts.sum()
    if w.min() <= 0 or w.max() / w.min() > 5:
        w = w / w.sum() + 1 / K
        w = w / w.sum()
    return w


@pytest.mark.parametrize("pool", ["batch", "image"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("passes", [0, 6])
def test_csa_matches_the_dense_reference(pool, case, passes):
    probs, valid = batch(**case, scale=2.5, dtype=torch.float64)
    B, K, H, W = probs.shape
    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, K, (2, H, W), generator=g)
    target[0, 0, 0] = IGNORE
    mc = torch.log(probs)[None] + 0.3 * torch.randn(passes, B, K, H, W, generator=g, dtype=torch.float64) if passes else None
    sel = get_selector("csa", num_classes=K, passes=passes, pool=pool)
    out = sel.select(probs, valid, mc_logits=mc, labeled_target=target, progress=0.5)
    counts = np.bincount(target.numpy()[target.numpy() < K], minlength=K).astype(float)
    w = prior_reference(counts, K)
    rho = cumulative_rho(0.5)
    if passes:
        members = mc.softmax(2).numpy()
        mean = members.mean(0)
        passed = np.array([[[welch_reference(members[:, b, :, i, j]) for j in range(W)] for i in range(H)] for b in range(B)])
    else:
        mean, passed = probs.numpy(), np.ones((B, H, W), dtype=bool)
    V = valid.numpy()
    flat = mean.transpose(0, 2, 3, 1)
    if pool == "batch":
        expected = csa_reference(flat.reshape(-1, K), (passed & V).ravel(), V.ravel(), rho, w).reshape(B, H, W)
    else:
        expected = np.stack([csa_reference(flat[b].reshape(-1, K), (passed[b] & V[b]).ravel(), V[b].ravel(), rho, w).reshape(H, W) for b in range(B)])
    assert np.array_equal(out.reliable.numpy(), expected)
    assert np.array_equal(out.label.numpy(), mean.argmax(1))


@pytest.mark.parametrize("H,W,eps", [(10, 20, 0.1), (20, 25, 0.2), (20, 40, 0.5)])
def test_csa_matches_the_dense_reference_in_every_eps_regime(H, W, eps):
    probs, valid = batch(B=1, K=3, H=H, W=W, scale=2.5, p_valid=1.0, dtype=torch.float64)
    n = H * W  # N'/K: 67, 167, 267 -> eps 0.1, 0.2, 0.5
    assert (0.5 if n / 3 >= 200 else 0.2 if n / 3 >= 100 else 0.1 if n / 3 >= 50 else 0.05) == eps
    out = get_selector("csa", num_classes=3, passes=0, class_prior=[0.5, 0.3, 0.2]).select(probs, valid, progress=0.9)
    w = prior_reference(np.array([0.5, 0.3, 0.2]), 3)
    expected = csa_reference(probs.numpy().transpose(0, 2, 3, 1).reshape(-1, 3), valid.numpy().ravel(), valid.numpy().ravel(), cumulative_rho(0.9), w)
    assert np.array_equal(out.reliable.numpy().ravel(), expected) and expected.sum() > 0


def test_csa_caps_each_class_at_its_prior_share():
    probs, valid = batch(B=2, K=3, H=20, W=20, scale=6.0, p_valid=1.0)
    sel = get_selector("csa", num_classes=3, passes=0, rho=0.5, class_prior=[0.5, 0.3, 0.2])
    out = sel.select(probs, valid)
    kept = torch.bincount(out.label[out.reliable], minlength=3)
    caps = [math.ceil(0.5 * w * 800) for w in (0.5, 0.3, 0.2)]
    assert all(kept[c] <= caps[c] for c in range(3)) and kept.sum() > 0.5 * sum(caps)


def test_csa_and_s4mc_reject_bad_settings():
    with pytest.raises(ValueError, match="csa.*passes must be 0 .* or >= 4"):
        get_selector("csa", num_classes=3, passes=2)
    with pytest.raises(ValueError, match="csa.*pool"):
        get_selector("csa", num_classes=3, pool="dataset")
    with pytest.raises(ValueError, match="s4mc.*e_joint as a list needs 3"):
        get_selector("s4mc", num_classes=3, e_joint=[0.5, 0.5])
    with pytest.raises(ValueError, match="s4mc.*connectivity"):
        get_selector("s4mc", num_classes=3, connectivity=6)
    with pytest.raises(ValueError, match="csa.*needs context \\['mc_logits'\\]"):
        get_selector("csa", num_classes=3).select(*batch(B=1, K=3))
