"""Selector speed, as ratios to references timed in the same process.

Absolute milliseconds depend on the machine; ratios on the same tensors, in the same
process, are what carries between machines. Every "x bare" ratio divides by the bare
threshold `(probs.amax(1) >= 0.95) & valid` (issue 21's definition: one reduction over the
classes, memory-bound). Also timed, for scale: one plain read of the probabilities
(`probs.sum()`, the floor any selector that looks at every probability must pay; the
"x one read" column), the naive threshold `(probs.max(1).values >= 0.95) & valid` (what a
training loop would often write; on the CPU its argmax makes it compute-bound, about 8x
the bare threshold) and the per-image SVD loop (the straightforward way to write CSL's split).

A selector that reads stochastic passes (`mc_passes` > 0: UPS, CSA) gets them as context,
drawn once before the timing: its time is its own work on those T passes, also given per
pass (ms and ratio divided by T). A selector with an iteration count (a parameter whose
name ends in `_iters`, CSA's Sinkhorn) is timed a second time, in the same rounds, with
that parameter at 1: (t(iters) - t(1)) / (iters - 1) is the cost of one iteration.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from bench.contract import available_selectors, build_context, get_selector

BARE = "bare threshold (amax)"
NAIVE = "naive threshold (max(1).values)"
READ = "one read (probs.sum())"
SVD_LOOP = "csl (per-image SVD loop)"
DEFAULT_SHAPES = ((8, 21, 128, 128), (16, 21, 256, 256))
ITERATION_SUFFIX = "_iters"  # a selector parameter counting iterations (CSA's sinkhorn_iters)


@dataclass
class KernelTiming:
    kernel: str
    device: str
    shape: str
    median_ms: float
    mpixel_per_s: float
    ratio_to_bare: float
    ratio_to_read: float
    gb_per_s: float  # probabilities read once per call, per second
    repeats: int
    passes: int = 0  # stochastic passes given as context (mc_passes)
    ms_per_pass: float | None = None  # median_ms / passes
    ratio_per_pass: float | None = None  # ratio_to_bare / passes
    iterations: int | None = None  # the value of the selector's `*_iters` parameter
    ms_per_iteration: float | None = None  # (t(iterations) - t(1)) / (iterations - 1)
    ratio_per_iteration: float | None = None  # ms_per_iteration / the bare threshold's ms


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"shape must look like BxKxHxW (e.g. 16x21x256x256), got {text!r}")
    shape = tuple(int(p) for p in parts)
    if min(shape) < 1 or shape[1] < 2:
        raise ValueError(f"shape {text!r} needs every size >= 1 and K >= 2")
    return shape  # type: ignore[return-value]


def synthetic_inputs(shape, device, seed=0) -> tuple[Tensor, Tensor]:
    b, k, h, w = shape
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(b, k, h, w, generator=g) * 3.0).softmax(dim=1)
    valid = torch.rand(b, h, w, generator=g) > 0.1
    return probs.to(device), valid.to(device)


def available_context(probs: Tensor, progress: float = 0.5) -> dict:
    """Every context a selector may declare, shaped as the trainer offers it; `build_context`
    takes what each selector asks for (the stochastic passes only when asked, untimed)."""
    base = torch.log(probs.clamp(min=1e-6))
    return {
        "mc_logits": lambda passes: base.unsqueeze(0) + 0.05 * torch.randn((passes, *probs.shape), device=probs.device),
        "labeled_probs": probs,
        "labeled_target": probs.argmax(1),
        "progress": progress,
    }


def bare_threshold(probs: Tensor, valid: Tensor) -> Tensor:
    """The reference every "x bare" ratio divides by: one `amax` over the classes."""
    return (probs.amax(1) >= 0.95) & valid


def naive_threshold(probs: Tensor, valid: Tensor) -> Tensor:
    """The same threshold through `max(1).values`, whose argmax is compute-bound on the CPU."""
    return (probs.max(1).values >= 0.95) & valid


def one_read(probs: Tensor) -> Tensor:
    """The physical floor: every probability read once, nothing else."""
    return probs.sum()


def svd_loop_csl(probs: Tensor, valid: Tensor, alpha: float = 2.0, eps: float = 1e-8) -> Tensor:
    """CSL weights written the straightforward way: per image, an SVD of its N x 2 features."""
    b, k, h, w = probs.shape
    conf, label = probs.max(dim=1)
    resid = probs.scatter(1, label.unsqueeze(1), 0.0)
    m = (1.0 - conf) / (k - 1)
    var = ((resid - m.unsqueeze(1)) ** 2).sum(1) / (k - 1)
    weight = torch.zeros(b, h, w, device=probs.device)
    for i in range(b):
        x = torch.stack([conf[i][valid[i]], var[i][valid[i]]], dim=1)
        if x.shape[0] < 2:
            continue
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        cluster = u.abs().argmax(dim=1)
        stats = []
        for j in range(2):
            members = x[cluster == j]
            if members.shape[0] >= 2:
                stats.append((members.mean(0), members.var(0)))
            else:
                stats.append((torch.zeros(2, device=x.device), torch.zeros(2, device=x.device)))
        mu, sd2 = max(stats, key=lambda t: float(t[0][0]))
        zc = (x[:, 0] - mu[0]) / torch.sqrt(sd2[0] + eps)
        zv = (mu[1] - x[:, 1]) / torch.sqrt(sd2[1] + eps)
        wi = torch.where((zc > 0) | (zv > 0), 1.0, torch.exp(-zc**2 / alpha) * torch.exp(-zv**2 / alpha))
        weight[i][valid[i]] = wi
    return weight


def _interleaved_times(
    kernels: list[tuple[str, Callable[[], object]]], device: torch.device, min_rounds: int, budget_s: float
) -> dict[str, list[float]]:
    """Seconds per call of every kernel, timed round-robin (one call of each per round),
    so a passing slowdown of the machine lands on all kernels alike, not on one ratio."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _, fn in kernels:  # warm-up: allocations, lazy initialisation, kernel caches
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name, _ in kernels}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < 200):
        for name, fn in kernels:
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def time_kernels(
    shapes=DEFAULT_SHAPES,
    device: str = "cpu",
    selectors: list[str] | None = None,
    min_repeats: int = 5,
    budget_s: float = 1.0,
    params: dict[str, dict] | None = None,
    include_svd_loop: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[KernelTiming]:
    dev = torch.device(device)
    names = selectors if selectors is not None else available_selectors()
    rows: list[KernelTiming] = []
    for shape in shapes:
        probs, valid = synthetic_inputs(shape, dev)
        b, k, h, w = shape
        pixels = b * h * w
        read_bytes = probs.numel() * probs.element_size()
        kernels: list[tuple[str, Callable[[], object]]] = [
            (BARE, lambda: bare_threshold(probs, valid)),
            (NAIVE, lambda: naive_threshold(probs, valid)),
            (READ, lambda: one_read(probs)),
        ]
        passes: dict[str, int] = {}
        one_iteration: dict[str, tuple[str, int]] = {}  # selector -> (its 1-iteration row, iterations)
        for name in names:
            given = (params or {}).get(name, {})
            sel = get_selector(name, num_classes=k, **given)
            ctx = build_context(sel, available_context(probs))  # the passes drawn here, untimed
            kernels.append((name, lambda sel=sel, ctx=ctx: sel.select(probs, valid, **ctx)))
            passes[name] = int(sel.mc_passes)
            for key, value in sel.params().items():
                if key.endswith(ITERATION_SUFFIX) and isinstance(value, int) and not isinstance(value, bool) and value > 1:
                    ref = f"{name} ({key}=1)"
                    once = get_selector(name, num_classes=k, **{**given, key: 1})
                    kernels.append((ref, lambda sel=once, ctx=ctx: sel.select(probs, valid, **ctx)))  # the same passes
                    passes[ref] = passes[name]
                    one_iteration[name] = (ref, value)
                    break
        if include_svd_loop:
            kernels.append((SVD_LOOP, lambda: svd_loop_csl(probs, valid)))
        if progress:
            progress(f"{len(kernels)} kernels at {'x'.join(map(str, shape))} on {device}")
        times = _interleaved_times(kernels, dev, min_repeats, budget_s * len(kernels))
        medians = {kernel: statistics.median(t) * 1e3 for kernel, t in times.items()}
        references = {ref for ref, _ in one_iteration.values()}
        bare_ms, read_ms = medians[BARE], medians[READ]
        for kernel, _ in kernels:
            median_ms = medians[kernel]
            row = KernelTiming(
                kernel=kernel,
                device=device,
                shape="x".join(map(str, shape)),
                median_ms=median_ms,
                mpixel_per_s=pixels / median_ms / 1e3,
                ratio_to_bare=median_ms / bare_ms,
                ratio_to_read=median_ms / read_ms,
                gb_per_s=read_bytes / median_ms / 1e6,
                repeats=len(times[kernel]),
            )
            t = passes.get(kernel, 0)
            if t > 0:
                row.passes, row.ms_per_pass, row.ratio_per_pass = t, median_ms / t, row.ratio_to_bare / t
            if kernel in one_iteration:
                ref, iters = one_iteration[kernel]
                row.iterations = iters
                row.ms_per_iteration = (median_ms - medians[ref]) / (iters - 1)
                row.ratio_per_iteration = row.ms_per_iteration / bare_ms
            elif kernel in references:
                row.iterations = 1
            rows.append(row)
        kernels.clear()  # drop the closures so this shape's tensors can be freed
    return rows


def _cell(value: float | int | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[KernelTiming]) -> str:
    header = (
        "selector", "device", "shape", "median ms", "Mpixel/s", "x bare", "x one read", "GB/s",
        "passes", "ms/pass", "x bare/pass", "iters", "ms/iter", "x bare/iter",
    )
    body = [
        (
            r.kernel, r.device, r.shape, f"{r.median_ms:.2f}", f"{r.mpixel_per_s:.1f}", f"{r.ratio_to_bare:.2f}", f"{r.ratio_to_read:.2f}", f"{r.gb_per_s:.1f}",
            str(r.passes) if r.passes else "-", _cell(r.ms_per_pass), _cell(r.ratio_per_pass),
            "-" if r.iterations is None else str(r.iterations), _cell(r.ms_per_iteration), _cell(r.ratio_per_iteration, 3),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(wd) for c, wd in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (wd + 2) for wd in widths) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def environment() -> dict:
    from bench.harness.runtime import keep_freed_memory

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "freed_memory_kept": keep_freed_memory(),
    }


def write_json(rows: list[KernelTiming], path: str | Path) -> None:
    from bench.files import atomic_write_text

    payload = {"environment": environment(), "timings": [asdict(r) for r in rows]}
    atomic_write_text(Path(path), json.dumps(payload, indent=2))
