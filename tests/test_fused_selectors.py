"""The compiled passes that large CPU batches run (CSLBENCH_KERNELS=auto from 2**22 values)
give the eager numbers: the moments over stochastic passes (bench/contract/pass_moments.py)
and the UPS and U2PL selections bit for bit; CSA's selection on these batches. S4MC's
compiled pass is tested in test_selectors_2024.py."""

import math
import shutil

import pytest
import torch

from bench.contract import get_selector
from bench.contract.pass_moments import fused_moments, softmax_moments, softmax_stats
from methods.u2pl import entropy_sum

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")


def passes(T, B, K, H, W, seed, ties=False):
    """T passes of logits: noisy copies of one map; with `ties`, values on a grid and half
    the image identical in every pass (zero variance, tied classes)."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        logits = (torch.randn(T, B, K, H, W, generator=g) * 2).round() / 2
        logits[:, :, :, : H // 2] = logits[:1, :, :, : H // 2]
        return logits
    return torch.randn(1, B, K, H, W, generator=g) * 3 + 0.3 * torch.randn(T, B, K, H, W, generator=g)


def both_paths(monkeypatch, fn):
    """fn() eagerly, then with every maybe_compiled pass compiled."""
    monkeypatch.setenv("CSLBENCH_KERNELS", "eager")
    eager = fn()
    monkeypatch.setenv("CSLBENCH_KERNELS", "compile")
    return eager, fn()


@pytest.mark.parametrize("T,temperatures,ddof,ties", [(10, (1.0, 2.0), 1, False), (4, (1.0, 3.0), 1, True), (17, (1.0,), 0, False), (6, (0.5,), 0, True)])
def test_pass_moments_compiled_are_the_eager_numbers(monkeypatch, T, temperatures, ddof, ties):
    logits = passes(T, 2, 5, 8, 16, seed=T, ties=ties)  # 8 * 16 pixels: the sum's order is ATen's cascade
    eager, fused = both_paths(monkeypatch, lambda: softmax_moments(logits, temperatures, ddof))
    for (mean_e, var_e), (mean_f, var_f) in zip(eager[0], fused[0]):
        assert torch.equal(mean_e, mean_f) and torch.equal(var_e, var_f)
    assert not eager[1] and not fused[1]
    assert not any(f.failed for f in (softmax_stats, fused_moments))  # it compiled


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_pass_moments_see_a_nonfinite_logit_either_way(monkeypatch, bad):
    logits = passes(4, 1, 3, 8, 8, seed=1)
    logits[2, 0, 1, 5, 3] = bad
    eager, fused = both_paths(monkeypatch, lambda: softmax_moments(logits, (1.0, 2.0)))
    assert eager[1] and fused[1]


@pytest.mark.parametrize("temperature,ties", [(2.0, False), (3.0, True)])
def test_ups_compiled_selection_is_the_eager_one(monkeypatch, temperature, ties):
    B, K, H, W, T = 2, 6, 8, 16, 5
    mc = passes(T, B, K, H, W, seed=4, ties=ties)
    valid = torch.rand(B, H, W, generator=torch.Generator().manual_seed(5)) < 0.8
    sel = get_selector("ups", num_classes=K, passes=T, temperature=temperature, tau_p=0.5, tau_n=0.2, kappa_n=0.1)
    eager, fused = both_paths(monkeypatch, lambda: sel.select(mc.softmax(2).mean(0), valid, mc_logits=mc))
    for field in ("label", "reliable", "weight", "negatives"):
        assert torch.equal(getattr(eager, field), getattr(fused, field)), field
    assert eager.reliable.any() and eager.negatives.any()


def test_u2pl_compiled_selection_is_the_eager_one(monkeypatch):
    g = torch.Generator().manual_seed(6)
    probs = (torch.randn(3, 7, 8, 16, generator=g) * 3).softmax(1)
    probs[0, :, :2] = (probs[0, :, :2] * 8).round() / 8  # exact zeros (the clamp at 1e-30) and ties
    probs[0, :, :2] /= probs[0, :, :2].sum(0, keepdim=True).clamp(min=1e-6)
    probs[0, :, 0, 0] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0])
    valid = torch.rand(3, 8, 16, generator=g) < 0.8
    sel = get_selector("u2pl", num_classes=7)
    for progress in (0.0, 0.5):
        eager, fused = both_paths(monkeypatch, lambda: sel.select(probs, valid, progress=progress))
        assert torch.equal(eager.reliable, fused.reliable) and torch.equal(eager.label, fused.label)
    assert not entropy_sum.failed  # it compiled


@pytest.mark.parametrize("params", [{}, {"pool": "image"}, {"passes": 0}])
def test_csa_compiled_selection_agrees_with_the_eager_one(monkeypatch, params):
    """Not bit for bit in general (inductor's exp and sqrt round differently from ATen's),
    but no point of these batches lies within float32 rounding of a decision."""
    B, K, H, W = 2, 5, 8, 16
    mc = passes(10, B, K, H, W, seed=7)
    probs = mc.softmax(2).mean(0)
    valid = torch.rand(B, H, W, generator=torch.Generator().manual_seed(8)) < 0.8
    target = torch.randint(0, K, (B, H, W), generator=torch.Generator().manual_seed(9))

    def select():
        sel = get_selector("csa", num_classes=K, **params)
        return sel.select(probs, valid, mc_logits=mc if sel.passes else None, labeled_target=target, progress=0.5)

    eager, fused = both_paths(monkeypatch, select)
    assert torch.equal(eager.reliable, fused.reliable) and torch.equal(eager.label, fused.label)
    assert eager.reliable.any()
