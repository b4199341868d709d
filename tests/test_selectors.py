"""Each selector against the formulas of SELECTORS.md, implemented independently in
tests/reference.py."""

import math

import numpy as np
import pytest
import torch

import reference as ref
from bench.contract import get_selector
from methods.daw import gaussian_crossing


def random_batch(B=3, K=5, H=12, W=10, scale=3.0, seed=0, p_valid=0.8):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(B, K, H, W, generator=g) * scale).softmax(1)
    valid = torch.rand(B, H, W, generator=g) < p_valid
    return probs, valid


def test_fixed_threshold_matches_formula():
    probs, valid = random_batch(scale=4.0)
    out = get_selector("fixed", num_classes=5, tau=0.8).select(probs, valid)
    C, lab = probs.max(1)
    expected = ((C >= 0.8) & valid).float()
    assert torch.equal(out.weight, expected)
    assert torch.equal(out.reliable, expected.bool())
    assert torch.equal(out.label, lab)


def test_all_keeps_every_valid_pixel():
    probs, valid = random_batch()
    out = get_selector("all", num_classes=5).select(probs, valid)
    assert torch.equal(out.weight, valid.float())
    assert torch.equal(out.reliable, valid)


def test_ael_weights_are_confidence_squared():
    probs, valid = random_batch()
    out = get_selector("ael", num_classes=5).select(probs, valid)
    C = probs.max(1).values
    assert torch.allclose(out.weight, torch.where(valid, C**2, 0.0), atol=1e-7)


CSL_CASES = [
    dict(),
    dict(features_="cv", variance="exact"),
    dict(features_="cgv", pick="linear"),
    dict(features_="cgv", pick="neglog", g_alpha=0.5),
    dict(features_="logc_neg_gv"),
    dict(features_="cv", pick="neglog", alpha=8.0),
    dict(alpha=8.0, variance="exact", pick="linear", lam=0.5),
]


@pytest.mark.parametrize("case", CSL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("K", [2, 3, 7, 21])
@pytest.mark.parametrize("seed", [0, 1])
def test_csl_matches_per_image_svd(case, K, seed):
    # Different valid masks per image: one sparse, one dense, one nearly empty.
    probs, valid = random_batch(B=3, K=K, H=16, W=12, scale=2.5 + seed, seed=seed)
    valid[0] &= torch.rand(16, 12, generator=torch.Generator().manual_seed(seed + 9)) < 0.3
    valid[2] = False
    valid[2, 3, 4:7] = True
    params = {("features" if k == "features_" else k): v for k, v in case.items()}
    out = get_selector("csl", num_classes=K, **params).select(probs, valid)
    expected = ref.csl_weights(probs, valid, **case)
    assert torch.allclose(out.weight.double(), expected, atol=1e-4), (out.weight.double() - expected).abs().max()
    assert torch.equal(out.reliable, out.weight == 1)
    assert torch.equal(out.label, probs.argmax(1))


def test_csl_on_confident_realistic_probabilities():
    # Peaked distributions (C close to 1) are where V is tiny and float32 cancellation
    # would show.
    probs, valid = random_batch(B=2, K=19, H=20, W=20, scale=6.0, seed=5)
    out = get_selector("csl", num_classes=19).select(probs, valid)
    expected = ref.csl_weights(probs, valid)
    assert torch.allclose(out.weight.double(), expected, atol=1e-4)


def test_covar_is_csl_with_cgv_and_linear_pick():
    probs, valid = random_batch(K=6, seed=3)
    out = get_selector("covar", num_classes=6).select(probs, valid)
    expected = ref.csl_weights(probs, valid, features_="cgv", pick="linear", lam=0.25, g_alpha=1.0)
    assert torch.allclose(out.weight.double(), expected, atol=1e-4)


def test_csl_keeps_weight_one_above_the_reliable_mean_and_decays_below():
    # Half the pixels very confident, half ambiguous: the confident cluster is reliable,
    # and the ambiguous pixels get weights strictly between 0 and 1.
    K = 4
    sure = torch.tensor([0.97, 0.01, 0.01, 0.01])
    unsure = torch.tensor([0.4, 0.35, 0.15, 0.1])
    noise = torch.linspace(-0.005, 0.005, 32)
    cols = [sure + torch.tensor([-n, n, 0, 0]) for n in noise] + [unsure + torch.tensor([-n, n, 0, 0]) for n in noise]
    probs = torch.stack(cols, dim=1).reshape(1, K, 8, 8)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    w = get_selector("csl", num_classes=K).select(probs, valid).weight.flatten()
    sure_w, unsure_w = w[:32], w[32:]
    # Confidence falls along the sure pixels: those at or above the cluster mean keep 1,
    # the rest decay monotonically but stay far above every ambiguous pixel.
    assert (sure_w[:16] == 1).all()
    assert (sure_w[1:] <= sure_w[:-1]).all() and sure_w[-1] < 1
    assert sure_w.min() > 0.1
    assert (unsure_w < 1e-3).all()


def test_softmatch_sequence_matches_reference():
    K = 4
    batches = [random_batch(B=2, K=K, seed=s) for s in range(5)]
    batches[3][1][:] = False  # a batch with no valid pixel updates nothing
    sel = get_selector("softmatch", num_classes=K, momentum=0.9)
    expected = ref.softmatch_sequence(batches, K, momentum=0.9)
    for (probs, valid), exp in zip(batches, expected):
        out = sel.select(probs, valid)
        assert np.allclose(out.weight.double().numpy(), exp, atol=1e-6)


def test_freematch_sequence_matches_reference():
    K = 5
    batches = [random_batch(B=2, K=K, seed=s, scale=2.0) for s in range(6)]
    sel = get_selector("freematch", num_classes=K, momentum=0.7)
    for (probs, valid), exp in zip(batches, ref.freematch_sequence(batches, K, momentum=0.7)):
        assert np.array_equal(sel.select(probs, valid).reliable.numpy(), exp)


def test_flexmatch_sequence_matches_reference():
    K = 3
    batches = [random_batch(B=2, K=K, seed=s, scale=4.0) for s in range(7)]
    sel = get_selector("flexmatch", num_classes=K, tau=0.9, window=3)
    for (probs, valid), exp in zip(batches, ref.flexmatch_sequence(batches, K, tau=0.9, window=3)):
        out = sel.select(probs, valid)
        assert np.array_equal(out.reliable.numpy(), exp)
    # The first batch has no history: every valid pixel kept, as FlexMatch at its start.
    fresh = get_selector("flexmatch", num_classes=K)
    probs, valid = batches[0]
    assert torch.equal(fresh.select(probs, valid).reliable, valid)


@pytest.mark.parametrize("progress", [0.0, 0.37, 1.0])
def test_u2pl_matches_numpy_percentile(progress):
    probs, valid = random_batch(B=2, K=6, seed=4)
    out = get_selector("u2pl", num_classes=6).select(probs, valid, progress=progress)
    assert np.array_equal(out.reliable.numpy(), ref.u2pl_mask(probs, valid, progress))
    kept = out.reliable.sum().item() / valid.sum().item()
    assert kept == pytest.approx(1 - 0.2 * (1 - progress), abs=0.02)


def test_ups_matches_reference_and_declares_passes():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 4, 6, 6, generator=g) * 4
    mc = base + 0.05 * torch.randn(10, 2, 4, 6, 6, generator=g)
    valid = torch.rand(2, 6, 6, generator=g) < 0.9
    sel = get_selector("ups", num_classes=4)
    assert sel.mc_passes == 10
    out = sel.select(mc.softmax(2).mean(0), valid, mc_logits=mc)
    lab, pos, neg = ref.ups_reference(mc, valid)
    assert torch.equal(out.label, lab)
    assert torch.equal(out.reliable, pos)
    assert torch.equal(out.negatives, neg)
    assert out.negatives.any() and out.reliable.any()
    assert get_selector("ups", num_classes=4, passes=4).mc_passes == 4


def test_ups_needs_mc_logits():
    probs, valid = random_batch(K=4)
    with pytest.raises(ValueError, match="ups.*mc_logits"):
        get_selector("ups", num_classes=4).select(probs, valid)


@pytest.mark.parametrize(
    "mu_a,var_a,mu_b,var_b",
    [(0.9, 0.01, 0.6, 0.02), (0.95, 0.001, 0.7, 0.05), (0.8, 0.02, 0.5, 0.02), (0.99, 1e-4, 0.4, 0.03)],
)
def test_daw_crossing_is_where_the_densities_meet(mu_a, var_a, mu_b, var_b):
    x = float(gaussian_crossing(mu_a, var_a, mu_b, var_b))

    def log_pdf(x, mu, var):
        return -0.5 * math.log(2 * math.pi * var) - (x - mu) ** 2 / (2 * var)

    assert min(mu_a, mu_b) <= x <= max(mu_a, mu_b)
    assert log_pdf(x, mu_a, var_a) == pytest.approx(log_pdf(x, mu_b, var_b), abs=1e-6)


def test_daw_threshold_follows_labeled_statistics():
    K = 3
    g = torch.Generator().manual_seed(0)
    sel = get_selector("daw", num_classes=K, momentum=0.5)
    probs, valid = random_batch(B=1, K=K, seed=1)
    assert torch.equal(sel.select(probs, valid).reliable, (probs.max(1).values >= 0.95) & valid)
    lp = (torch.randn(2, K, 8, 8, generator=g) * 3).softmax(1)
    target = lp.argmax(1)
    target[:, :4] = (target[:, :4] + 1) % K  # top half wrong
    target[0, 0, 0] = 255  # ignored
    sel.select(probs, valid, labeled_probs=lp, labeled_target=target)
    C, pred = lp.max(1)
    known = target != 255
    right, wrong = C[(pred == target) & known].double(), C[(pred != target) & known].double()
    expected = float(gaussian_crossing(right.mean().item(), right.var().item(), wrong.mean().item(), wrong.var().item()))
    assert float(sel.tau) == pytest.approx(min(max(expected, 1 / K), 1.0), abs=1e-9)
    out = sel.select(probs, valid)
    assert torch.equal(out.reliable, (probs.max(1).values >= sel.tau) & valid)


def test_daw_needs_both_labeled_inputs():
    probs, valid = random_batch(K=3)
    with pytest.raises(ValueError, match="daw.*both"):
        get_selector("daw", num_classes=3).select(probs, valid, labeled_probs=probs)
