"""The one place a training step reaches its selector.

A step calls `seam(probs, valid, **available)`. The seam takes from `available` the
context the selector declares, counts the stochastic passes that ran, times the call and
hands the selector its deferred value checks; the loop reads all of that explicitly with
`read()` at its log steps. On CUDA the time is taken with events, read at those steps,
so measuring adds no synchronisation to the step.

A run that banks its teacher (`bank_points`) also runs `StateFollowers` behind the seam:
fresh copies of every stateful selector that needs no stochastic passes, fed the same
predictions, so that each bank point can store the state they would have had in training
(docs/banks.md). They never touch the run's selection, its RNG or its selector time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.contract import CheckFailure, DeferredChecks, Selection, Selector, available_selectors, build_context, get_selector


@dataclass
class SeamReading:
    failures: list[CheckFailure]  # value checks that failed since the run began, earliest first
    selector_s: float  # time inside `select` so far
    extra_forward_passes: int  # stochastic passes run for the selector so far


def runs_with_defaults(selector: Selector) -> bool:
    return selector.params() == get_selector(selector.name, num_classes=selector.num_classes).params()


class StateFollowers:
    """Every registered stateful selector without stochastic passes, with its defaults,
    following the teacher's stream: their states are what a bank point stores for them.
    Selectors with passes are left out (their passes would be extra forward passes and
    random draws that change training); a bank warms those up instead."""

    def __init__(self, num_classes: int, skip: str | None = None):
        self.selectors = {}
        for name in available_selectors():
            sel = get_selector(name, num_classes=num_classes)
            if name != skip and sel.state_dict() and sel.mc_passes == 0:
                self.selectors[name] = sel
        self.since = dict.fromkeys(self.selectors, 0)  # the iteration each began following
        self.checks = DeferredChecks()  # never read: a follower's bad input is the run's selector's too
        self.host_s = 0.0  # host time in the followers (all of it on the CPU); part of training wall time

    def __call__(self, probs: Tensor, valid: Tensor, available: dict) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            for sel in self.selectors.values():
                sel.select(probs, valid, checks=self.checks, **build_context(sel, available))
        self.host_s += time.perf_counter() - start

    def states(self) -> dict:
        """Per selector name: its parameters, the iteration it began following, its state."""
        return {n: {"params": s.params(), "since": self.since[n], "state": s.state_dict()} for n, s in self.selectors.items()}

    def state_dict(self) -> dict:
        return {"states": self.states(), "host_s": self.host_s}

    def load_state_dict(self, state: dict | None, iteration: int) -> None:
        """A follower the checkpoint lacks (banking switched on at resume) starts following now."""
        stored = (state or {}).get("states", {})
        for name, sel in self.selectors.items():
            if name in stored:
                sel.load_state_dict(stored[name]["state"])
                self.since[name] = stored[name]["since"]
            else:
                self.since[name] = iteration
        self.host_s = (state or {}).get("host_s", 0.0)


class SelectorSeam:
    def __init__(self, selector: Selector, device: torch.device, followers: StateFollowers | None = None):
        self.selector, self.device, self.followers = selector, device, followers
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
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            selection = self.selector.select(probs, valid, checks=self.checks, **context)
            end.record()
            self._events.append((start, end))
        if self.followers is not None:
            self.followers(probs, valid, available)
        return selection

    def read(self) -> SeamReading:
        """What the calls so far left on the device: their GPU time (waits for them) and
        the failed checks (one host read)."""
        for start, end in self._events:
            end.synchronize()
            self.selector_s += start.elapsed_time(end) / 1e3
        self._events.clear()
        return SeamReading(self.checks.failures(), self.selector_s, self.extra_forward_passes)

    def selector_states(self) -> dict:
        """The states a bank point stores: the followers', and the run's own selector's when
        it runs with its defaults (then it is the one that followed the stream)."""
        states = self.followers.states() if self.followers is not None else {}
        if self.selector.state_dict() and runs_with_defaults(self.selector):
            states[self.selector.name] = {"params": self.selector.params(), "since": 0, "state": self.selector.state_dict()}
        return states

    def state_dict(self) -> dict:
        state = {"selector": self.selector.state_dict(), "selector_s": self.selector_s, "extra_forward_passes": self.extra_forward_passes}
        if self.followers is not None:
            state["followers"] = self.followers.state_dict()
        return state

    def load_state_dict(self, state: dict, iteration: int = 0) -> None:
        self.selector.load_state_dict(state["selector"])
        self.selector_s, self.extra_forward_passes = state["selector_s"], state["extra_forward_passes"]
        if self.followers is not None:
            self.followers.load_state_dict(state.get("followers"), iteration)
