"""Value checks a training step records on the device and reads when it chooses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class CheckFailure:
    selector: str
    message: str
    iteration: int  # the first iteration at which it failed
    diverged: bool  # the model's output stopped being finite (rather than a misuse)


class DeferredChecks:
    """Value checks of `select` kept on the device and read when the caller chooses.

    Checking that probabilities are finite and sum to 1 needs a host read of the answer;
    on a GPU that is a synchronisation in every step. Given to `Selector.select(...,
    checks=...)`, each check instead records, on the device, the first `checks.iteration` at which it
    failed; the training loop reads them at its log steps (before any evaluation or
    checkpoint), so an error still names the iteration where it happened.
    """

    def __init__(self):
        self.iteration = 0
        self._first: dict[tuple[str, str, bool], Tensor] = {}

    def note(self, selector: str, bad: Tensor, message: str, diverged: bool = False) -> None:
        key = (selector, message, diverged)
        first = self._first.get(key)
        if first is None:
            first = torch.full((), -1, dtype=torch.int64, device=bad.device)
        self._first[key] = torch.where(bad & (first < 0), self.iteration, first)

    def failures(self) -> list[CheckFailure]:
        """Every check that failed so far, earliest first (one host read)."""
        if not self._first:
            return []
        keys = list(self._first)
        firsts = torch.stack([self._first[k] for k in keys]).tolist()
        found = [CheckFailure(s, m, i, d) for (s, m, d), i in zip(keys, firsts) if i >= 0]
        return sorted(found, key=lambda f: f.iteration)
