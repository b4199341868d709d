"""When a run evaluates, logs, checkpoints and banks the teacher's predictions, as plain arithmetic."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Moments:
    """What happens after an iteration (besides the step itself)."""

    evaluate: bool  # mIoU on val (every eval_every, and at the end)
    log: bool  # a curve point (every log_every, and at every evaluation)
    checkpoint: bool  # every checkpoint_every, except at the end (the final checkpoint is the finish's)
    bank: bool  # the teacher's predictions banked and every registered selector scored on them (bank_points)

    @property
    def reads_device(self) -> bool:
        """The steps' results are read on the host only here (logs and checkpoints)."""
        return self.log or self.checkpoint


@dataclass(frozen=True)
class Schedule:
    iters: int
    eval_every: int
    log_every: int
    checkpoint_every: int
    bank_points: frozenset[int]

    @classmethod
    def for_run(cls, cfg, semi_supervised: bool) -> "Schedule":
        n = cfg.bank_points if semi_supervised else 0
        points = frozenset(round(cfg.iters * k / n) for k in range(1, n + 1)) if n else frozenset()
        return cls(cfg.iters, cfg.eval_every, cfg.log_every, cfg.checkpoint_every, points)

    def after(self, done: int) -> Moments:
        """The moments after `done` iterations (1-based)."""
        evaluate = done % self.eval_every == 0 or done == self.iters
        return Moments(
            evaluate=evaluate,
            log=evaluate or done % self.log_every == 0,
            checkpoint=done % self.checkpoint_every == 0 and done < self.iters,
            bank=done in self.bank_points,
        )
