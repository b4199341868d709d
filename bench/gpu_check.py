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
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

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

    from bench.kernels import time_kernels

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
    from bench.config import load_config
    from bench.train import Trainer

    overrides = model + [f"selector={selector}", "framework=unimatch", f"device={device}", "iters=100000", f"out={out}",
                         "wandb_mode=disabled", "workers=0", "probe_images=0"]
    return Trainer(load_config(overrides=overrides), show_progress=False)


def _pinned(loaded: list[dict]) -> list[dict]:
    return [{k: v.pin_memory() if isinstance(v, torch.Tensor) and torch.cuda.is_available() else v for k, v in b.items()} for b in loaded]


def bare_unimatch_step(model, optimizer, loaded, device, autocast, tau: float = 0.95):
    """UniMatch's training step as its authors write it, inline: the reference the harness
    is measured against (same model, batch, views and losses; a fixed threshold)."""
    lab, unl, mix = ({k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in loaded)
    x, y = lab["image"], lab["mask"]
    bx, bu = x.shape[0], unl["weak"].shape[0]
    with autocast():
        with torch.no_grad():
            model.eval()
            pred_mix = model(mix["weak"]).detach().float()
            conf_mix, mask_mix = pred_mix.softmax(1).max(1)
            model.train()
        box1, box2 = unl["box1"].unsqueeze(1), unl["box2"].unsqueeze(1)
        s1 = torch.where(box1, mix["strong1"], unl["strong1"])
        s2 = torch.where(box2, mix["strong2"], unl["strong2"])
        pred, pred_fp = model(torch.cat([x, unl["weak"]]), need_fp=True)
        pred_x, pred_u, pred_fp = pred[:bx], pred[bx:].detach().float(), pred_fp[bx:]
        pred_s1, pred_s2 = model(torch.cat([s1, s2])).split(bu)
        conf_u, mask_u = pred_u.softmax(1).max(1)
        ignore = ~unl["valid"]

        def target(box):
            b = box.squeeze(1)
            return torch.where(b, mask_mix, mask_u), torch.where(b, conf_mix, conf_u), torch.where(b, ~mix["valid"], ignore)

        def unsup(pred_s, mask, conf, ign):
            ce = F.cross_entropy(pred_s.float(), mask, reduction="none")
            keep = ((conf >= tau) & ~ign).float()
            return (ce * keep).sum() / (~ign).sum().clamp(min=1)

        loss_x = F.cross_entropy(pred_x.float(), y, ignore_index=255)
        loss_s1 = unsup(pred_s1, *target(box1))
        loss_s2 = unsup(pred_s2, *target(box2))
        loss_fp = unsup(pred_fp, mask_u, conf_u, ignore)
        loss = (loss_x + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp) / 2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


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
    from bench.train import build_optimizer

    model_args = GPU_MODEL if device == "cuda" else CPU_MODEL
    rows = []
    loaded = None
    for variant, selector in (("bare UniMatch loop (fixed 0.95)", None), ("harness, fixed", "fixed"), ("harness, csl", "csl")):
        trainer = _trainer(device, selector or "fixed", out / (selector or "bare"), model_args)
        dev = trainer.device
        if loaded is None:
            loaded = _pinned([next(iter(loader)) for loader in trainer._loaders()])
        trainer.model.train()
        if selector is None:
            optimizer = build_optimizer(trainer.model, trainer.config)
            seconds = _timed_steps(lambda t: bare_unimatch_step(trainer.model, optimizer, loaded, dev, trainer.autocast), steps, warmup, dev)
            selection_share = None
        else:
            def step(t):
                trainer.iteration(t, loaded)
                if (t + 1) % 10 == 0:
                    trainer._read_step_results()  # a log step's reads, as in training
            seconds = _timed_steps(step, steps, warmup, dev)
            trainer._read_step_results()
            selection_share = trainer.log.cost["selector_s"] / max(seconds * (steps + warmup), 1e-12)
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
    from bench.kernels import environment
    from bench.records import atomic_write_text

    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
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
