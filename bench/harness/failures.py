"""Why a run stops: what the device recorded (a non-finite loss, a diverged model output,
a selector given what it cannot take), turned into one error naming its iteration."""

from __future__ import annotations

import math

import torch

from bench.harness.replicas import Replicas
from bench.harness.runlog import RunLog
from bench.harness.seam import SeamReading


class DivergedError(RuntimeError):
    """The loss stopped being a number: training on would only produce noise."""

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration


class SelectorInputError(ValueError):
    """A selector was given what it cannot take (found by its deferred value checks)."""

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration


def raise_step_problems(log: RunLog, seam: SeamReading | None, replicas: Replicas) -> None:
    """Raise the earliest problem the steps recorded (at one iteration: divergence before
    a non-finite loss before a misuse). Data-parallel workers stop together: a worker left
    waiting in the next all_reduce for one that raised would wait for ever."""
    problems = []
    bad_loss = log.first_nonfinite_loss()
    if bad_loss is not None:
        done, losses = bad_loss
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        shown = ", ".join(f"{k}={'NaN' if math.isnan(v) else v}" for k, v in bad.items())
        kind = "NaN" if any(map(math.isnan, bad.values())) else "infinite"
        problems.append((done, 1, DivergedError(f"loss is {kind} at iteration {done} ({shown})", done)))
    for f in seam.failures if seam is not None else []:
        if f.diverged:
            message = f"model output is NaN or infinite at iteration {f.iteration}: training diverged (try a lower lr)"
            problems.append((f.iteration, 0, DivergedError(message, f.iteration)))
        else:
            problems.append((f.iteration, 2, SelectorInputError(f"selector '{f.selector}': {f.message} (at iteration {f.iteration})", f.iteration)))
    failed_workers = int(replicas.sum(torch.tensor([float(bool(problems))]))) if replicas.world > 1 else 0
    if problems:
        raise min(problems, key=lambda p: p[:2])[2]
    if failed_workers:
        raise RuntimeError(f"{failed_workers} other data-parallel worker(s) stopped (their error is in their log and the record)")
