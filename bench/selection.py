"""The selector contract: what a pseudo-label selector receives, returns, and how it is found.

    from bench.selection import get_selector, available_selectors, Selection
    sel = get_selector("csl", num_classes=21, alpha=8.0)
    out = sel.select(probs, valid)          # probs (B,K,H,W) float, valid (B,H,W) bool

A selector is a subclass of `Selector` registered with `@register_selector("name")`.
Built-in selectors live in `methods/` and `csl/` and are imported explicitly (an import
error propagates); other packages add theirs through the entry-point group
`cslbench.selectors`. The harness only ever reaches a concrete selector through this
registry.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from bench.compiled import maybe_compiled
from bench.confidence import ClassMoments, class_moments
from bench.suggest import did_you_mean

ENTRY_POINT_GROUP = "cslbench.selectors"
BUILTIN_MODULES = (
    "methods.fixed",
    "methods.ups",
    "methods.softmatch",
    "methods.freematch",
    "methods.flexmatch",
    "methods.u2pl",
    "methods.ael",
    "methods.daw",
    "methods.covar",
    "methods.s4mc",
    "methods.semivl",
    "methods.corrmatch",
    "methods.cwbass",
    "methods.csa",
    "csl.selector",
)
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

    name: ClassVar[str] = "?"
    mc_passes: int = 0  # extra stochastic forward passes the trainer must run per step
    context_keys: ClassVar[tuple[str, ...]] = ()  # context this selector reads
    required_context: ClassVar[tuple[str, ...]] = ()  # context it cannot work without

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"selector '{self.name}': num_classes must be an integer >= 2, got {num_classes!r}"
            )
        self.num_classes = num_classes

    # -- public API -------------------------------------------------------------------
    def select(self, probs: Tensor, valid: Tensor, **context: Any) -> Selection:
        self._check_input(probs, valid)
        self._check_context(context)
        if probs.dtype != torch.float32:
            probs = probs.float()
        # Selection is fp32 whatever autocast region the caller is in (a bf16 matmul or
        # reduction would quantise confidences near the thresholds).
        with torch.autocast(probs.device.type, enabled=False):
            moments = class_moments(probs)
            self._check_values(moments, valid, probs)
            return self._select(probs, valid, moments, **context)

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
        return {k: getattr(self, k) for k in _constructor_params(type(self))}

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
        checks = _DEFERRED_CHECKS.get()
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
        """Raise `message` if the 0-dim bool `bad` is true: now, or (inside
        `deferred_value_checks`) when the caller reads the checks."""
        checks = _DEFERRED_CHECKS.get()
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


@dataclass(frozen=True)
class CheckFailure:
    selector: str
    message: str
    iteration: int  # the first iteration at which it failed
    diverged: bool  # the model's output stopped being finite (rather than a misuse)


class DeferredChecks:
    """Value checks of `select` kept on the device and read when the caller chooses.

    Checking that probabilities are finite and sum to 1 needs a host read of the answer;
    on a GPU that is a synchronisation in every step. Inside `deferred_value_checks(checks)`
    each check instead records, on the device, the first `checks.iteration` at which it
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


_DEFERRED_CHECKS: contextvars.ContextVar[DeferredChecks | None] = contextvars.ContextVar("deferred_checks", default=None)


@contextlib.contextmanager
def deferred_value_checks(checks: DeferredChecks):
    """Selectors called in the block record their value checks in `checks` instead of
    reading them on the host (see DeferredChecks)."""
    token = _DEFERRED_CHECKS.set(checks)
    try:
        yield checks
    finally:
        _DEFERRED_CHECKS.reset(token)


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


# ------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Selector]] = {}
_loaded = False


def register_selector(name: str) -> Callable[[type[Selector]], type[Selector]]:
    """Class decorator: make a `Selector` subclass available as `get_selector(name)`."""

    def decorate(cls: type[Selector]) -> type[Selector]:
        if not (isinstance(cls, type) and issubclass(cls, Selector)):
            raise TypeError(f"@register_selector('{name}') needs a Selector subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"selector name '{name}' is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_selectors() -> None:
    global _loaded
    if _loaded:
        return
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # re-raised with the plugin named, never swallowed
            raise ImportError(
                f"selector plugin '{ep.name}' ({ep.value}) from entry-point group "
                f"'{ENTRY_POINT_GROUP}' failed to import: {exc}"
            ) from exc
        if isinstance(obj, type) and issubclass(obj, Selector) and ep.name not in _REGISTRY:
            register_selector(ep.name)(obj)
    _loaded = True


def available_selectors() -> list[str]:
    _load_selectors()
    return sorted(_REGISTRY)


def selector_class(name: str) -> type[Selector]:
    _load_selectors()
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown selector '{name}'{did_you_mean(name, _REGISTRY)}; "
            f"available selectors: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def check_selector(name: str, params: dict[str, Any]) -> type[Selector]:
    """The class registered as `name`, after checking that it takes every parameter given:
    configs and sweep files are checked with this before anything runs."""
    cls = selector_class(name)
    valid_params = _constructor_params(cls)
    unknown = [p for p in params if p not in valid_params]
    if unknown:
        hint = did_you_mean(unknown[0], valid_params)
        raise ValueError(
            f"selector '{name}' has no parameter {unknown[0]!r}{hint}; "
            f"valid parameters: {', '.join(valid_params) or '(none)'}"
        )
    return cls


def get_selector(name: str, num_classes: int, **params: Any) -> Selector:
    """Build the selector registered as `name`; unknown parameters are an error."""
    return check_selector(name, params)(num_classes=num_classes, **params)


def _constructor_params(cls: type[Selector]) -> dict[str, Any]:
    """Keyword parameters of the constructor (besides num_classes) with their defaults."""
    signature = inspect.signature(cls.__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name not in ("self", "num_classes")
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def selector_params(name: str) -> dict[str, Any]:
    """The parameters of a registered selector and their defaults."""
    return _constructor_params(selector_class(name))


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"{obj.dtype} tensor of shape {tuple(obj.shape)}"
    return type(obj).__name__
