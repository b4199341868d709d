"""Selector kernel speed (pytest-benchmark), reported as ratios to the bare threshold
`(probs.amax(1) >= 0.95) & valid` timed in the same run on the same tensors.

    pytest benchmarks/ --benchmark-group-by=param:shape        # CPU, 2 threads
    CSLBENCH_THREADS=8 pytest benchmarks/ -k csl               # other thread counts
    CSLBENCH_QUICK=1 pytest benchmarks/                          # the small shape, fewer rounds (CI)

Each benchmark stores `ratio_to_bare` (and for CSL `speedup_vs_svd_loop`) in extra_info;
`--benchmark-json FILE` keeps them. Nothing here asserts a wall time: the ratios are
printed at the end of the session for a person to read.
"""

import os
import statistics
import time

import pytest
import torch

from bench.tools.kernels import available_context, bare_threshold, svd_loop_csl, synthetic_inputs
from bench.contract import available_selectors, build_context, get_selector

QUICK = os.environ.get("CSLBENCH_QUICK") == "1"
SHAPES = {"8x21x128x128": (8, 21, 128, 128)} if QUICK else {"8x21x128x128": (8, 21, 128, 128), "16x21x256x256": (16, 21, 256, 256)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_inputs: dict = {}
_reference_ms: dict = {}


def inputs(shape, device):
    key = (shape, device)
    if key not in _inputs:
        _inputs.clear()  # keep one shape resident at a time
        _inputs[key] = synthetic_inputs(SHAPES[shape], device)
    return _inputs[key]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reference_ms(kind, shape, device):
    """Median ms of a reference kernel, measured once per session in this process."""
    key = (kind, shape, device)
    if key not in _reference_ms:
        probs, valid = inputs(shape, device)
        fn = (lambda: bare_threshold(probs, valid)) if kind == "bare" else (lambda: svd_loop_csl(probs, valid))
        fn()
        times = []
        for _ in range((15 if kind == "bare" else 5) // (3 if QUICK else 1)):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        _reference_ms[key] = statistics.median(times) * 1e3
    return _reference_ms[key]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", ["bare"] + available_selectors())
def test_selector_speed(benchmark, ratio_log, name, shape, device):
    probs, valid = inputs(shape, device)
    if name == "bare":
        fn = lambda: bare_threshold(probs, valid)  # noqa: E731
    else:
        sel = get_selector(name, num_classes=probs.shape[1])
        ctx = build_context(sel, available_context(probs))
        fn = lambda: sel.select(probs, valid, **ctx)  # noqa: E731

    def run():
        fn()
        sync(device)

    benchmark.group = f"{shape} {device}"
    rounds = 5 if name != "bare" and sel.mc_passes else 15
    benchmark.pedantic(run, rounds=max(2, rounds // 3) if QUICK else rounds, warmup_rounds=1)
    median_ms = benchmark.stats.stats.median * 1e3
    ratio = median_ms / reference_ms("bare", shape, device)
    benchmark.extra_info["ratio_to_bare"] = round(ratio, 3)
    line = f"{name:10s} {shape:14s} {device:4s} {median_ms:9.2f} ms  {ratio:6.2f} x bare"
    if name == "csl":
        speedup = reference_ms("svd_loop", shape, device) / median_ms
        benchmark.extra_info["speedup_vs_svd_loop"] = round(speedup, 2)
        line += f"  {speedup:5.1f} x faster than the per-image SVD loop"
    ratio_log.append(line)
