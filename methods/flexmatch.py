"""FlexMatch's class-wise flexible thresholds (NeurIPS 2021), adapted to pixels.

The original keeps one "learned" class per unlabeled image across the whole dataset. Pixels
have no identity across iterations, so this adaptation keeps the counts of the last
`window` batches instead: sigma_c is the number of valid pixels predicted c with C >= tau,
N_unused the number of valid pixels below tau, both summed over the window. Then
beta_c = sigma_c / max(max_c sigma_c, N_unused) (the threshold warm-up form) and
w = 1[C >= tau * beta_{k*} / (2 - beta_{k*})] (the convex mapping). Counts are updated
after thresholding, so a batch is judged by the batches before it; with no history every
beta is 0 and every valid pixel is kept, as in the original at its start.
"""

from __future__ import annotations

import torch

from bench.contract import Selector, hard_selection


class FlexibleThreshold(Selector):
    def __init__(self, num_classes: int, tau: float = 0.95, window: int = 64):
        super().__init__(num_classes)
        if not 0.0 <= tau <= 1.0:
            raise self._error(f"tau must lie in [0, 1], got {tau}")
        if window < 1:
            raise self._error(f"window must be >= 1 batch, got {window}")
        self.tau = float(tau)
        self.window = int(window)
        # Row i: counts of batch i (mod window); columns 0..K-1 sigma_c, column K unused.
        self.history = torch.zeros(self.window, num_classes + 1, dtype=torch.float64)
        self.step = 0

    def class_beta(self) -> torch.Tensor:
        counts = self.history.sum(dim=0)
        sigma, unused = counts[:-1], counts[-1]
        denom = torch.maximum(sigma.max(), unused)
        return torch.where(denom > 0, sigma / denom.clamp(min=1), torch.zeros_like(sigma))

    def _select(self, probs, valid, moments, **context):
        self.history = self.history.to(probs.device)
        beta = self.class_beta().float()
        scale = beta / (2.0 - beta)
        threshold = self.tau * scale[moments.label]
        selection = hard_selection(moments.label, moments.confidence >= threshold, valid)

        confident = (moments.confidence >= self.tau) & valid
        label = moments.label.masked_fill(~confident, self.num_classes)  # K = unused
        label = label.masked_fill(~valid, self.num_classes + 1)  # counted in a slot then dropped
        # index_add_ rather than bincount, which reads max(label) on the host on a GPU
        counts = torch.zeros(self.num_classes + 2, dtype=torch.float64, device=label.device)
        counts.index_add_(0, label.flatten(), counts.new_ones(()).expand(label.numel()))
        self.history[self.step % self.window] = counts[: self.num_classes + 1]
        self.step += 1
        return selection

    def state_dict(self):
        return {"history": self.history.cpu().clone(), "step": self.step}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if tuple(state["history"].shape) != tuple(self.history.shape):
            raise self._error(
                f"state history has shape {tuple(state['history'].shape)}, expected "
                f"{tuple(self.history.shape)} (num_classes={self.num_classes}, window={self.window})"
            )
        self.history = state["history"].double().clone()
        self.step = int(state["step"])
