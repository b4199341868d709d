"""A teacher's predictions on fixed unlabelled images, with their hidden truth apart: what
selectors are scored on, in memory (`Predictions`) or on disk (a prediction bank)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Predictions:
    probs: list[Tensor]  # per image (K, H, W)
    gt: list[Tensor]  # per image (H, W), IGNORE = void: the hidden truth, never given to a selector
    mc_logits: list[Tensor] | None  # per image (T, K, H, W): stochastic passes
    labeled: tuple[Tensor, Tensor] | None  # a labelled batch: probabilities (B, K, H, W), targets (B, H, W)
    num_classes: int
    progress: float = 1.0  # of the run at these predictions (the context `progress`)
    # stateful selectors' states in training at these predictions, per name: params, since, state
    selector_states: dict = field(default_factory=dict)

    def available(self, i: int, name: str = "?") -> dict:
        """Every context a selector may declare for image `i` (`build_context` takes what it asks for)."""
        available: dict = {"progress": self.progress}
        if self.mc_logits is not None:
            available["mc_logits"] = lambda passes: self.passes(i, passes, name)
        if self.labeled is not None:
            available["labeled_probs"], available["labeled_target"] = self.labeled
        return available

    def passes(self, i: int, passes: int, name: str = "?") -> Tensor:
        have = self.mc_logits[i].shape[0]
        if passes > have:
            raise ValueError(f"selector '{name}' asks for {passes} stochastic passes but only {have} were recorded (record with more mc_passes)")
        return self.mc_logits[i][:passes, None]

    def valid(self, i: int) -> Tensor:
        """Whole images: every pixel is image (no padding)."""
        return torch.ones(self.probs[i].shape[1:], dtype=torch.bool)
