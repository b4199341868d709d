"""What a pseudo-label selector receives and returns.

    from bench.contract import get_selector
    sel = get_selector("csl", num_classes=21, alpha=8.0)
    out = sel.select(probs, valid)          # probs (B,K,H,W) float, valid (B,H,W) bool

A selector is a subclass of `Selector` named by an entry point (bench/contract/registry.py).
The harness only ever reaches a concrete selector through the registry.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from bench.contract.checks import DeferredChecks
from bench.contract.compiled import maybe_compiled
from bench.contract.confidence import ClassMoments, class_moments

# Everything a trainer may hand a selector. Unlabeled ground truth is deliberately absent:
# any other key is rejected, so it cannot reach a selector by accident.
CONTEXT_KEYS = ("mc_logits", "labeled_probs", "labeled_target", "progress")
# Softmax outputs sum to 1; a much larger error means logits or unnormalised scores.
_SUM_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Selection:
    """What a selector decides for each pixel of a batch."""

    label: Tensor  # int64 (B, H, W) pseudo-label
    weight: Tensor  # float32 (B, H, W) in [0, 1], exactly 0 where not valid
    reliable: Tensor  # bool (B, H, W): the hard "selected" set
    negatives: Tensor | None = None  # bool (B, K, H, W) negative labels (UPS)


class Selector:
    """Base class: validates input once, then defers to `_select`.

    Subclasses take their parameters as plain keyword arguments of `__init__` (after
    `num_classes`) and implement `_select(probs, valid, moments, **context)`.
    """

    name: ClassVar[str] = "?"  # set by the registry: the entry point's name
    mc_passes: int = 0  # extra stochastic forward passes the trainer must run per step
    context_keys: ClassVar[tuple[str, ...]] = ()  # context this selector reads
    required_context: ClassVar[tuple[str, ...]] = ()  # context it cannot work without
    _checks: DeferredChecks | None = None  # during `select`: where value checks go (None: raise now)

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"selector '{self.name}': num_classes must be an integer >= 2, got {num_classes!r}"
            )
        self.num_classes = num_classes

    # -- public API -------------------------------------------------------------------
    def select(self, probs: Tensor, valid: Tensor, *, checks: DeferredChecks | None = None, **context: Any) -> Selection:
        """The selection for a batch. With `checks`, value checks (finite, sums to 1, and
        a subclass's `_check`) are recorded there on the device instead of being read on
        the host now: a training step passes them so that it never synchronises."""
        self._check_input(probs, valid)
        self._check_context(context)
        if probs.dtype != torch.float32:
            probs = probs.float()
        self._checks = checks
        try:
            # Selection is fp32 whatever autocast region the caller is in (a bf16 matmul or
            # reduction would quantise confidences near the thresholds).
            with torch.autocast(probs.device.type, enabled=False):
                moments = class_moments(probs)
                self._check_values(moments, valid, probs)
                return self._select(probs, valid, moments, **context)
        finally:
            self._checks = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"selector '{self.name}': state keys {sorted(state)} do not match "
                f"the expected {sorted(expected)}"
            )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"

    def params(self) -> dict[str, Any]:
        """The constructor arguments, as they would be passed to `get_selector`."""
        return {k: getattr(self, k) for k in constructor_params(type(self))}

    # -- for subclasses ---------------------------------------------------------------
    def _select(
        self, probs: Tensor, valid: Tensor, moments: ClassMoments, **context: Any
    ) -> Selection:
        raise NotImplementedError

    def _error(self, message: str) -> ValueError:
        return ValueError(f"selector '{self.name}': {message}")

    # -- validation -------------------------------------------------------------------
    def _check_input(self, probs: Tensor, valid: Tensor) -> None:
        if not isinstance(probs, Tensor) or not probs.is_floating_point():
            raise self._error(f"probs must be a floating-point tensor, got {_describe(probs)}")
        if probs.dim() != 4:
            raise self._error(
                f"probs must have rank 4 (B, K, H, W), got shape {tuple(probs.shape)}"
            )
        if probs.shape[1] < 2:
            raise self._error(f"probs must have K >= 2 classes, got K={probs.shape[1]}")
        if probs.shape[1] != self.num_classes:
            raise self._error(
                f"probs has K={probs.shape[1]} classes but the selector was built with "
                f"num_classes={self.num_classes}"
            )
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
            raise self._error(
                f"valid must be a bool tensor (use valid.bool()), got {_describe(valid)}"
            )
        expected = (probs.shape[0], *probs.shape[2:])
        if tuple(valid.shape) != expected:
            raise self._error(
                f"valid must have shape (B, H, W) = {expected}, got {tuple(valid.shape)}"
            )
        if valid.device != probs.device:
            raise self._error(f"valid is on {valid.device} but probs is on {probs.device}")

    def _check_context(self, context: dict[str, Any]) -> None:
        unknown = sorted(set(context) - set(CONTEXT_KEYS))
        if unknown:
            raise self._error(
                f"unknown context {unknown}; valid context keys are {list(CONTEXT_KEYS)} "
                "(unlabeled ground truth is never passed to a selector)"
            )
        missing = [k for k in self.required_context if context.get(k) is None]
        if missing:
            raise self._error(f"needs context {missing} (pass it as keyword arguments to select)")

    def _check_values(self, moments: ClassMoments, valid: Tensor, probs: Tensor) -> None:
        # NaN or -Inf anywhere along the class axis makes the sum of squares below the
        # max non-finite; +Inf or NaN as the max makes C non-finite.
        nonfinite, deviation = value_problems.for_input(probs)(moments, valid)
        checks = self._checks
        if checks is not None:  # a training step: nothing read on the host here
            checks.note(self.name, nonfinite, "probs contains NaN or Inf", diverged=True)
            checks.note(self.name, deviation > _SUM_TOLERANCE, _NOT_PROBABILITIES)
            return
        # One host read for both checks; the diagnosis runs only on the error path.
        problems = torch.stack([nonfinite.float(), deviation]).tolist()
        if problems[0]:
            raise self._error("probs contains NaN or Inf")
        if problems[1] > _SUM_TOLERANCE:
            raise self._error(f"{_NOT_PROBABILITIES} (largest deviation {problems[1]:.3g})")

    def _check(self, bad: Tensor, message: str, diverged: bool = False) -> None:
        """Raise `message` if the 0-dim bool `bad` is true: now, or (when `select` was
        given `checks`) when the caller reads the checks."""
        checks = self._checks
        if checks is not None:
            checks.note(self.name, bad, message, diverged)
        elif bool(bad):
            raise self._error(message)


@maybe_compiled
def value_problems(moments: ClassMoments, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(any probability NaN or infinite, largest |sum - 1| at a valid pixel), both 0-dim."""
    nonfinite = ~torch.isfinite(moments.below_sq + moments.confidence)
    deviation = (moments.total - 1.0).abs().masked_fill(~valid, 0.0)
    return nonfinite.any(), deviation.amax() if deviation.numel() else deviation.sum()


_NOT_PROBABILITIES = "probs must be probabilities that sum to 1 over the class axis at valid pixels; apply softmax to logits first"


def build_context(selector: Selector, available: Mapping[str, Any]) -> dict[str, Any]:
    """The context `selector` declares (`context_keys`), taken from what the caller has.

    Every caller (training, analysis, kernel timing, demos, tests) offers what it can and
    lets the selector's declaration decide, so no caller names a selector. A value may be a
    callable, evaluated only when a selector asks for it: `mc_logits` is called with the
    number of stochastic passes the selector declares (`mc_passes`), every other callable
    with no argument. A declared key the caller cannot offer is left out; the selector's
    `required_context` check then names it.
    """
    context = {}
    for key in selector.context_keys:
        if key not in CONTEXT_KEYS:
            raise ValueError(f"selector '{selector.name}' declares unknown context {key!r}; valid keys: {list(CONTEXT_KEYS)}")
        if key not in available:
            continue
        value = available[key]
        if callable(value):
            if key == "mc_logits" and selector.mc_passes < 1:
                continue  # declared but no passes asked for: nothing to compute
            value = value(selector.mc_passes) if key == "mc_logits" else value()
        context[key] = value
    return context


# ------------------------------------------------------------------------------------
# Helpers shared by selectors
# ------------------------------------------------------------------------------------
def hard_selection(label: Tensor, keep: Tensor, valid: Tensor, **extra: Any) -> Selection:
    """Selection for a selector whose weight is 1 on the kept valid pixels and 0 elsewhere."""
    reliable = keep & valid
    return Selection(label=label, weight=reliable.float(), reliable=reliable, **extra)


def soft_selection(
    label: Tensor, weight: Tensor, valid: Tensor, reliable: Tensor | None = None
) -> Selection:
    """Selection for a soft selector: weight zero outside valid; the reliable set is the
    full-weight pixels unless the selector defines it."""
    weight = weight.float().clamp(0.0, 1.0).masked_fill(~valid, 0.0)
    reliable = weight == 1.0 if reliable is None else reliable & valid
    return Selection(label=label, weight=weight, reliable=reliable)


def masked_mean(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of `values` over `valid` pixels and the pixel count (mean 0 when none)."""
    count = valid.sum()
    total = torch.where(valid, values, 0.0).sum()
    return total / count.clamp(min=1), count


def constructor_params(cls: type[Selector]) -> dict[str, Any]:
    """Keyword parameters of the constructor (besides num_classes) with their defaults."""
    signature = inspect.signature(cls.__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name not in ("self", "num_classes")
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"{obj.dtype} tensor of shape {tuple(obj.shape)}"
    return type(obj).__name__
