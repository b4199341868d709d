"""The one place a training step reaches its selector.

A step calls `seam(probs, valid, **available)`. The seam takes from `available` the
context the selector declares, counts the stochastic passes that ran, times the call and
hands the selector its deferred value checks; the loop reads all of that explicitly with
`read()` at its log steps. On CUDA the time is taken with events, read at those steps,
so measuring adds no synchronisation to the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.contract import CheckFailure, DeferredChecks, Selection, Selector, build_context


@dataclass
class SeamReading:
    failures: list[CheckFailure]  # value checks that failed since the run began, earliest first
    selector_s: float  # time inside `select` so far
    extra_forward_passes: int  # stochastic passes run for the selector so far


class SelectorSeam:
    def __init__(self, selector: Selector, device: torch.device):
        self.selector, self.device = selector, device
        self.checks = DeferredChecks()
        self.selector_s = 0.0
        self.extra_forward_passes = 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def begin(self, iteration: int) -> None:
        """The iteration the next calls belong to (a failed check names it)."""
        self.checks.iteration = iteration

    def __call__(self, probs: Tensor, valid: Tensor, **available) -> Selection:
        """`available` holds every context a selector may declare: values, or callables
        computed only when it asks (the extra forward passes)."""
        context = build_context(self.selector, available)
        if "mc_logits" in context:  # the passes that ran, not the ones asked for
            self.extra_forward_passes += context["mc_logits"].shape[0]
        if self.device.type != "cuda":
            start = time.perf_counter()
            selection = self.selector.select(probs, valid, checks=self.checks, **context)
            self.selector_s += time.perf_counter() - start
            return selection
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        selection = self.selector.select(probs, valid, checks=self.checks, **context)
        end.record()
        self._events.append((start, end))
        return selection

    def read(self) -> SeamReading:
        """What the calls so far left on the device: their GPU time (waits for them) and
        the failed checks (one host read)."""
        for start, end in self._events:
            end.synchronize()
            self.selector_s += start.elapsed_time(end) / 1e3
        self._events.clear()
        return SeamReading(self.checks.failures(), self.selector_s, self.extra_forward_passes)

    def state_dict(self) -> dict:
        return {"selector": self.selector.state_dict(), "selector_s": self.selector_s, "extra_forward_passes": self.extra_forward_passes}

    def load_state_dict(self, state: dict) -> None:
        self.selector.load_state_dict(state["selector"])
        self.selector_s, self.extra_forward_passes = state["selector_s"], state["extra_forward_passes"]
