"""The 2024+ selectors (SELECTORS-2024.md) against naive float64 references written here:
loops over images, pixels, classes and neighbours; numpy percentiles; scipy's t quantile;
a dense Sinkhorn with the dummy row and column written out as the source does."""

import math

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
