"""The per-pixel moments of a class distribution that every selector starts from."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class ClassMoments:
    """Maps of shape (B, H, W) computed from probabilities P of shape (B, K, H, W)."""

    confidence: Tensor  # C = max_k P_k
    label: Tensor  # argmax_k P_k (first index on ties), int64
    ties: Tensor  # number of classes whose probability equals C (>= 1)
    below_sum: Tensor  # sum of P_k over classes with P_k < C
    below_sq: Tensor  # sum of P_k^2 over classes with P_k < C

    @property
    def residual_sum(self) -> Tensor:
        """sum_k R_k, with R = P and its argmax slot set to 0 (tied maxima stay in R)."""
        return self.below_sum + (self.ties - 1) * self.confidence

    @property
    def residual_sq(self) -> Tensor:
        """sum_k R_k^2."""
        return self.below_sq + (self.ties - 1) * self.confidence.square()

    @property
    def total(self) -> Tensor:
        """sum_k P_k (1 for a softmax)."""
        return self.below_sum + self.ties * self.confidence
