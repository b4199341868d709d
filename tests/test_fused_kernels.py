"""The fused implementations of the selection kernels give the eager numbers: the one-pass
Triton kernel (through Triton's interpreter on the CPU), the reductions a GPU runs, and
everything under torch.compile; a failing compiler falls back to eager with one warning."""

import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import bench.contract.compiled as compiled
from bench.contract.confidence import _class_moments_cpu, _reduced_moments
from bench.tools.kernels import available_context
from bench.contract import available_selectors, build_context, get_selector

FIELDS = ("confidence", "label", "ties", "below_sum", "below_sq")


def reference_moments(probs):
    """Float64, written from the definitions: max, first argmax, ties, sums below the max."""
    p = probs.double()
    conf = p.amax(1, keepdim=True)
    below = torch.where(p < conf, p, 0.0)
    return {
        "confidence": conf.squeeze(1),
        "label": p.argmax(1),  # the first maximal index on the CPU
        "ties": (p == conf).sum(1).double(),
        "below_sum": below.sum(1),
        "below_sq": (below * below).sum(1),
    }


def inputs():
    g = torch.Generator().manual_seed(3)
    cases = []
    for b, k, h, w in [(2, 5, 7, 9), (1, 2, 3, 4), (3, 21, 1, 1), (2, 19, 16, 33)]:
        cases.append((torch.randn(b, k, h, w, generator=g) * 3).softmax(1))
    tied = torch.randint(0, 4, (2, 6, 5, 5), generator=g).float() + 0.5  # many exact ties
    cases.append(tied / tied.sum(1, keepdim=True))
    return cases


def assert_moments_match(moments, probs):
    expected = reference_moments(probs)
    for field in FIELDS:
        got = getattr(moments, field)
        if field == "label":
            assert torch.equal(got, expected[field]), field
        else:
            torch.testing.assert_close(got.double(), expected[field], atol=1e-6, rtol=1e-5, msg=field)


@pytest.mark.parametrize("case", range(5))
def test_cpu_loop_and_gpu_reductions_match_the_definitions(case):
    probs = inputs()[case]
    assert_moments_match(_class_moments_cpu(probs), probs)
    from bench.contract.confidence import ClassMoments

    assert_moments_match(ClassMoments(*_reduced_moments.fn(probs)), probs)


# Triton reads TRITON_INTERPRET when it is imported, so the kernel tests run in a child
# pytest with it set (test_triton_kernel_through_the_interpreter); here they skip.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def interpreted_triton():
    if not INTERPRETED:
        pytest.skip("runs in the child process of test_triton_kernel_through_the_interpreter")
    import bench.contract.triton_moments as module

    return module


def test_triton_kernel_through_the_interpreter():
    pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("this is the child process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted or triton_mode or one_pass or nan_visible"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-2000:]
    assert re.search(r"\b7 passed", child.stdout), child.stdout[-1000:]


@pytest.mark.parametrize("case", range(5))
def test_the_one_pass_triton_kernel_matches_the_definitions(interpreted_triton, case):
    probs = inputs()[case]
    assert_moments_match(interpreted_triton.triton_class_moments(probs), probs)


def test_the_triton_kernel_leaves_nan_visible_to_the_value_checks(interpreted_triton):
    probs = inputs()[0].clone()
    probs[0, 2, 1, 1] = float("nan")
    probs[1, 0, 2, 2] = float("inf")
    m = interpreted_triton.triton_class_moments(probs)
    finite = torch.isfinite(m.below_sq + m.confidence)
    assert not finite[0, 1, 1] and not finite[1, 2, 2] and int(finite.sum()) == finite.numel() - 2


def test_triton_mode_runs_selectors_through_the_kernel(interpreted_triton, monkeypatch):
    probs, valid = inputs()[0], torch.ones(2, 7, 9, dtype=torch.bool)
    eager = get_selector("csl", num_classes=5).select(probs, valid)
    monkeypatch.setenv("CSLBENCH_KERNELS", "triton")
    calls = []
    original = interpreted_triton.triton_class_moments
    monkeypatch.setattr(interpreted_triton, "triton_class_moments", lambda p: (calls.append(p.shape), original(p))[1])
    fused = get_selector("csl", num_classes=5).select(probs, valid)
    assert calls == [probs.shape]
    torch.testing.assert_close(fused.weight, eager.weight, atol=1e-5, rtol=0)
    assert torch.equal(fused.label, eager.label)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiled_selectors_give_the_eager_results(monkeypatch):
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(2, 5, 16, 16, generator=g) * 3).softmax(1)
    valid = torch.rand(2, 16, 16, generator=g) > 0.2
    for name in available_selectors():
        monkeypatch.setenv("CSLBENCH_KERNELS", "eager")
        sel = get_selector(name, num_classes=5)
        torch.manual_seed(0)  # UPS draws its passes: the same draws for both
        eager = sel.select(probs, valid, **build_context(sel, available_context(probs)))
        monkeypatch.setenv("CSLBENCH_KERNELS", "compile")
        sel = get_selector(name, num_classes=5)
        torch.manual_seed(0)
        fused = sel.select(probs, valid, **build_context(sel, available_context(probs)))
        torch.testing.assert_close(fused.weight, eager.weight, atol=1e-5, rtol=0, msg=name)
        assert torch.equal(fused.label, eager.label), name
        assert (fused.reliable != eager.reliable).sum() <= 1, name
    from bench.contract.confidence import _reduced_moments as moments
    from csl.selector import csl_weight

    assert not moments.failed and not csl_weight.failed  # they really compiled


def test_a_failing_compiler_warns_once_and_falls_back_to_eager(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setenv("CSLBENCH_KERNELS", "compile")
    double = compiled.maybe_compiled(lambda x: x * 2)
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match="failed.*eagerly"):
        assert torch.equal(double(x), x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(double(x), x * 2)


def test_the_mode_comes_from_the_environment_and_is_checked(monkeypatch):
    big, small = torch.empty(compiled.AUTO_MIN_NUMEL), torch.empty(10)
    monkeypatch.setenv("CSLBENCH_KERNELS", "auto")
    assert compiled.should_compile(big) and not compiled.should_compile(small)
    monkeypatch.setenv("CSLBENCH_KERNELS", "eager")
    assert not compiled.should_compile(big)
    monkeypatch.setenv("CSLBENCH_KERNELS", "compile")
    assert compiled.should_compile(small)
    monkeypatch.setenv("CSLBENCH_KERNELS", "fast")
    with pytest.raises(ValueError, match="CSLBENCH_KERNELS='fast'.*auto"):
        compiled.kernel_mode()
