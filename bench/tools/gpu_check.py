"""`make gpu-check`: what this project claims about the GPU path, measured in one run.

Three parts, each written to `runs/gpu-check.json` and a markdown table beside it:
1. the CUDA tests (host-sync freedom of every framework and selector under
   `torch.cuda.set_sync_debug_mode("error")`, deterministic kill-and-resume, the fused
   kernels against the definitions), counted from pytest's JUnit XML;
2. the kernel table at the issue's shapes: every selector against one read of the
   probabilities and the naive threshold, CSL under each kernel mode, and the per-image
   SVD loop the authors' code uses;
3. training throughput: the harness's UniMatch step against a bare UniMatch loop written
   inline (same model, batch and precision), images/s, the selection share of the step,
   peak memory.

Without CUDA it runs the CPU-side parts at small sizes and says so: the numbers a GPU
should give are then still unmeasured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path

import torch

GPU_SHAPES = ((16, 21, 321, 321), (4, 19, 801, 801))
CPU_SHAPES = ((4, 21, 128, 128),)
CUDA_TESTS = ["tests/test_gpu.py", "tests/test_host_sync.py", "tests/test_fused_kernels.py", "tests/test_precision.py"]
# The recipe's step: DeepLabV3+ ResNet-101 at output stride 16, crop 321, 8 + 8 images, bf16.
GPU_MODEL = ["backbone=resnet101", "output_stride=16", "crop=321", "batch_size=8", "unlabeled_batch_size=8", "head_channels=256"]
CPU_MODEL = ["backbone=test_resnet", "crop=64", "batch_size=2", "head_channels=16", "aspp_dilations=[1,2]"]


# ----------------------------------------------------------------------------------------
# 1. tests
# ----------------------------------------------------------------------------------------
def run_tests(timeout_s: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *CUDA_TESTS],
                capture_output=True, text=True, timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as exc:  # report what is known and go on to the measurements
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            proc = subprocess.CompletedProcess(exc.cmd, returncode=124, stdout=out + f"\n(timed out after {timeout_s} s)", stderr="")
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        failed = []
        if xml.exists():
            for suite in ET.parse(xml).getroot().iter("testsuite"):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
            for case in ET.parse(xml).getroot().iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "returncode": proc.returncode, "seconds": time.perf_counter() - started,
            "tail": proc.stdout[-2000:] if proc.returncode else ""}


# ----------------------------------------------------------------------------------------
# 2. kernels
# ----------------------------------------------------------------------------------------
@contextmanager
def kernel_mode(mode: str):
    previous = os.environ.get("CSLBENCH_KERNELS")
    os.environ["CSLBENCH_KERNELS"] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CSLBENCH_KERNELS", None)
        else:
            os.environ["CSLBENCH_KERNELS"] = previous


def kernel_rows(device: str, shapes, budget_s: float) -> list[dict]:
    from dataclasses import asdict

    from bench.tools.kernels import time_kernels

    modes = ["eager", "compile"] + (["triton"] if device == "cuda" else [])
    rows = []
    for mode in modes:
        with kernel_mode(mode):
            everything = mode == "eager"  # every selector once; CSL under the other modes
            timings = time_kernels(shapes, device, selectors=None if everything else ["csl", "fixed"],
                                   budget_s=budget_s, include_svd_loop=everything)
        rows += [{**asdict(t), "mode": mode} for t in timings]
    return rows


# ----------------------------------------------------------------------------------------
# 3. training throughput
# ----------------------------------------------------------------------------------------
def _trainer(device: str, selector: str, out: Path, model: list[str]):
    from bench.harness.config import load_config
    from bench.harness.train import Trainer

    overrides = model + [f"selector={selector}", "framework=unimatch", f"device={device}", "iters=100000", f"out={out}",
                         "wandb_mode=disabled", "workers=0", "probe_images=0"]
    return Trainer(load_config(overrides=overrides), show_progress=False)


def _pinned(loaded: list[dict]) -> list[dict]:
    return [{k: v.pin_memory() if isinstance(v, torch.Tensor) and torch.cuda.is_available() else v for k, v in b.items()} for b in loaded]


def _timed_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for t in range(warmup):
        step(t)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for t in range(warmup, warmup + steps):
        step(t)
    sync()
    return (time.perf_counter() - start) / steps


def throughput(device: str, steps: int, warmup: int, out: Path) -> list[dict]:
    from bench.harness.build import build_optimizer, to_device
    from bench.tools.bare_step import bare_unimatch_step

    model_args = GPU_MODEL if device == "cuda" else CPU_MODEL
    rows = []
    loaded = None
    for variant, selector in (("bare UniMatch loop (fixed 0.95)", None), ("harness, fixed", "fixed"), ("harness, csl", "csl")):
        trainer = _trainer(device, selector or "fixed", out / (selector or "bare"), model_args)
        dev = trainer.parts.device
        if loaded is None:
            loaded = _pinned([next(iter(loader)) for loader in trainer.parts.train_loaders(0)])
        trainer.parts.model.train()
        if selector is None:
            optimizer = build_optimizer(trainer.parts.model, trainer.config)

            def step(t):
                on_device = [to_device(b, dev) for b in loaded]  # copied every step, as the harness does
                bare_unimatch_step(trainer.parts.model, optimizer, *on_device, autocast=trainer.parts.autocast)

            seconds = _timed_steps(step, steps, warmup, dev)
            selection_share = None
        else:
            def step(t):
                trainer.step(t, loaded)
                if (t + 1) % 10 == 0:
                    trainer.read_steps()  # a log step's reads, as in training
            seconds = _timed_steps(step, steps, warmup, dev)
            trainer.read_steps()
            selection_share = trainer.parts.seam.selector_s / max(seconds * (steps + warmup), 1e-12)
        images = trainer.config.batch_size + trainer.config.u_batch_size
        rows.append({
            "variant": variant,
            "seconds_per_step": seconds,
            "images_per_s": images / seconds,
            "selection_share": selection_share,
            "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "model": " ".join(model_args),
        })
        del trainer
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    bare = rows[0]["seconds_per_step"]
    for row in rows:
        row["ratio_to_bare"] = row["seconds_per_step"] / bare
    return rows


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    lines = [f"# gpu-check: {report['device']}", ""]
    if not report["cuda"]:
        lines += ["**No CUDA device: only the CPU-side parts ran, at small sizes. The GPU numbers are unmeasured.**", ""]
    t = report["tests"]
    lines += [f"Tests ({', '.join(CUDA_TESTS)}): {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped "
              f"in {t['seconds']:.0f} s" + (f"; failed: {', '.join(t['failed'])}" if t["failed"] else ""), ""]
    lines += ["## Kernels", "", "| selector | mode | shape | median ms | x one read | x bare threshold |", "|---|---|---|---|---|---|"]
    for r in report["kernels"]:
        lines.append(f"| {r['kernel']} | {r['mode']} | {r['shape']} | {r['median_ms']:.2f} | {r['ratio_to_read']:.2f} | {r['ratio_to_bare']:.2f} |")
    lines += ["", "## Training step", "", "| variant | s/step | images/s | x bare | selection share | peak GiB |", "|---|---|---|---|---|---|"]
    for r in report["throughput"]:
        share = f"{100 * r['selection_share']:.2f}%" if r["selection_share"] is not None else "–"
        peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "–"
        lines.append(f"| {r['variant']} | {r['seconds_per_step']:.3f} | {r['images_per_s']:.1f} | {r['ratio_to_bare']:.3f} | {share} | {peak} |")
    lines += ["", f"Model: {report['throughput'][0]['model'] if report['throughput'] else '–'}; finished in {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.tools.kernels import environment
    from bench.files import atomic_write_text

    parser = argparse.ArgumentParser(prog="python -m bench.tools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu-check.json", help="JSON report (a .md table is written beside it)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else f"no GPU: CPU, {torch.get_num_threads()} threads"
    print(f"gpu-check on {name}" + ("" if cuda else " (CPU-side parts only)"), flush=True)
    report = {"device": name, "cuda": cuda, "environment": environment()}
    print("1/3 tests ...", flush=True)
    report["tests"] = run_tests(300) if not args.skip_tests else {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "passed": 0, "failed": [], "seconds": 0.0}
    print("2/3 kernels ...", flush=True)
    report["kernels"] = kernel_rows(device, GPU_SHAPES if cuda else CPU_SHAPES, budget_s=0.5 if cuda else 0.3)
    print("3/3 training step ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["throughput"] = throughput(device, args.steps if cuda else 3, 3 if cuda else 1, Path(tmp))
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2))
    table = markdown(report)
    atomic_write_text(out.with_suffix(".md"), table)
    print(table)
    failed = report["tests"]["failures"] + report["tests"]["errors"] + (report["tests"]["returncode"] not in (0, None))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
