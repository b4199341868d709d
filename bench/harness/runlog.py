"""What a run has measured so far, as one object that checkpoints itself.

The loop adds to it (step losses, evaluations, selection-quality updates, time) and reads
curve points and the cost summary from it; `state_dict()` / `load_state_dict()` carry every
field, so a resumed run continues the same curves, meters and clocks. Step losses stay on
the device (summed, with the first non-finite step remembered) until a log step reads them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import resource
import time
from dataclasses import dataclass, field, fields

import torch

from bench.harness.replicas import Replicas
from bench.contract.metrics import SelectionQualityMeter


@dataclass
class RunLog:
    meter: SelectionQualityMeter | None  # selection quality over all of training (semi-supervised runs)
    meter_at_log: dict | None = None  # the meter's state at the last log step
    curves: list[dict] = field(default_factory=list)
    pending_losses: dict = field(default_factory=dict)  # sums since the last log step (device tensors between log steps)
    pending_steps: int = 0
    pending_eval: dict = field(default_factory=dict)  # an evaluation not yet in the curves
    last_eval: dict | None = None
    best_val: tuple[float, int] = (math.nan, -1)  # (mIoU, iteration)
    selection_over_training: list[dict] = field(default_factory=list)  # every selector scored at each bank point
    cost: dict = field(default_factory=lambda: {"wall_s": 0.0})  # training time (the selector's own is the seam's)
    _mark: float = field(default=0.0, repr=False)  # wall-clock start of the time not yet counted
    _replicas: Replicas = field(default_factory=Replicas, repr=False)  # data-parallel workers whose counts add up
    _first_bad: tuple | None = field(default=None, repr=False)  # (iteration, losses) of the first non-finite step, on the device

    def __post_init__(self):
        if self.meter is not None and self.meter_at_log is None:
            self.meter_at_log = self.meter.state_dict()

    # -- updates ------------------------------------------------------------------------
    def add_step(self, done: int, losses: dict[str, torch.Tensor]) -> None:
        """Add one step's losses without reading them on the host."""
        values = torch.stack([v.detach().double() for v in losses.values()])  # summed as the floats they were
        for k, v in zip(losses, values):
            self.pending_losses[k] = self.pending_losses.get(k, 0.0) + v
        if self._first_bad is None:
            self._first_bad = (torch.full((), -1, dtype=torch.int64, device=values.device), torch.zeros_like(values), list(losses))
        first, at_first, names = self._first_bad
        new = ~torch.isfinite(values).all() & (first < 0)
        self._first_bad = (torch.where(new, done, first), torch.where(new, values, at_first), names)
        self.pending_steps += 1

    def first_nonfinite_loss(self) -> tuple[int, dict[str, float]] | None:
        """(iteration, the losses then) of the first step whose loss was NaN or infinite."""
        if self._first_bad is None:
            return None
        first, values, names = self._first_bad
        iteration = int(first)
        return (iteration, dict(zip(names, values.tolist()))) if iteration >= 0 else None

    def add_eval(self, result: dict, done: int) -> None:
        self.last_eval = result
        if not (self.best_val[0] >= result["miou"]):  # NaN-safe: the first evaluation wins
            self.best_val = (result["miou"], done)
        self.pending_eval = {"val_miou": result["miou"]}

    def log_point(self, done: int, lr: float) -> dict:
        """Close the interval since the last log step: mean losses, the selection quality
        of that interval, and an evaluation made in it (at the iteration it was made)."""
        point = {"iter": done, "lr": lr}
        steps = max(self.pending_steps, 1) * self._replicas.world
        point.update({k: v / steps for k, v in self._summed_losses().items()})
        if self.meter is not None:
            meter = self.global_meter()
            q = meter.since(self.meter_at_log)
            point.update(sel_precision=q["precision"], sel_recall=q["recall"], sel_coverage=q["coverage"], sel_weighted_precision=q["weighted_precision"])
            self.meter_at_log = meter.state_dict()
        point.update(self.pending_eval)
        self.pending_eval, self.pending_losses, self.pending_steps = {}, {}, 0
        self.curves.append(point)
        return point

    def global_meter(self) -> SelectionQualityMeter | None:
        """The selection meter summed over the data-parallel workers (this one when alone)."""
        if self.meter is None or self._replicas.world == 1:
            return self.meter
        total = SelectionQualityMeter(self.meter.num_classes, self.meter.auroc_bins)
        total.load_state_dict({k: self._replicas.sum(v) for k, v in self.meter.state_dict().items()})
        return total

    def _summed_losses(self) -> dict[str, float]:
        """The pending loss sums, added over the workers (one host read)."""
        if not self.pending_losses:
            return {}
        names = list(self.pending_losses)
        local = torch.stack([torch.as_tensor(self.pending_losses[k], dtype=torch.float64).cpu() for k in names])
        return dict(zip(names, self._replicas.sum(local).tolist()))

    @property
    def last_val(self) -> float:
        return self.last_eval["miou"] if self.last_eval is not None else math.nan

    # -- training time ------------------------------------------------------------------
    def start_clock(self) -> None:
        self._mark = time.perf_counter()

    def charge_time(self) -> None:
        now = time.perf_counter()
        self.cost["wall_s"] += now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def untimed(self):
        """Evaluation and checkpoints are not training time."""
        self.charge_time()
        try:
            yield
        finally:
            self._mark = time.perf_counter()

    def cost_summary(self, done: int, device: torch.device, seam=None) -> dict:
        """Training time and memory; with the selector seam, its time and extra passes."""
        trained = max(done, 1)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        wall = self.cost["wall_s"]
        followers = getattr(seam, "followers", None)
        banking = {"bank_followers_ms_per_iter": 1e3 * followers.host_s / trained} if followers is not None else {}  # inside wall_s
        return {
            **banking,
            "wall_s": wall,
            "iters": done,
            "it_per_s": trained / wall if wall else math.nan,
            "selector_ms_per_iter": 1e3 * (seam.selector_s if seam is not None else 0.0) / trained,
            "extra_forward_passes": seam.extra_forward_passes if seam is not None else 0,
            "peak_mem_mb": peak,
            "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        }

    # -- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if not f.name.startswith("_") and f.name not in ("meter", "pending_losses")}
        # Counts summed over the workers: each worker resumes from them, rank 0 keeping them
        # and the others starting from zero, so the sums stay those of the global batch.
        state["meter"] = self.global_meter().state_dict() if self.meter is not None else None
        state["pending_losses"] = self._summed_losses()
        return state

    def load_state_dict(self, state: dict) -> None:
        expected = {f.name for f in fields(self) if not f.name.startswith("_")}
        if set(state) != expected:
            raise ValueError(f"run log state has keys {sorted(state)}, expected {sorted(expected)}")
        if (state["meter"] is None) != (self.meter is None):
            raise ValueError("run log state and this run disagree on whether selection is measured")
        for name in expected - {"meter"}:
            setattr(self, name, copy.deepcopy(state[name]))
        self.best_val = tuple(self.best_val)
        if self.meter is not None:
            self.meter.load_state_dict(state["meter"])
        if not self._replicas.is_main:
            self.pending_losses = {}
            if self.meter is not None:
                self.meter.reset()
