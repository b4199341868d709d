"""The selector contract, checked for any registered selector: built in or from a plugin.

    cslbench check-selector margin                  # every check, one line each
    from bench.tools.check_selector import run_checks, check_state
    check_state("margin")                           # raises ContractError (an AssertionError)

One implementation of every per-selector check; tests/test_contract.py, tests/test_precision.py
and a plugin's own tests (examples/selector-plugin/) call these functions. Each check takes
a registered name, builds the selector through the registry as the trainer does, and
raises `ContractError` saying which selector, which check, which case and what was seen.
Nothing here names a selector except `fixed`, the speed reference: what differs between
selectors (fewer stochastic passes, stochastic labels, state) is derived from what each
declares (its parameters, `mc_passes`, `context_keys`, `state_dict()`).

The checks (`CHECKS`, in order):

- registry: registered, documented (its class's or module's docstring: what `cslbench
  selectors` shows), every parameter has a default, `get_selector` builds it, `params()`
  rebuilds it, unknown parameters are refused, its declared context is valid.
- errors: bad probs (rank, K, dtype, NaN/Inf, not summing to 1), a non-bool or misshapen
  `valid`, `num_classes` < 2, unknown context keys, missing required context: each a
  ValueError that names the selector and says what is wrong.
- degenerate: no valid pixel in an image or the batch, one valid pixel, identical pixels,
  uniform and one-hot probabilities, B=1 1x1 images; K = 2 and 5. Every output obeys
  `check_output` (below).
- properties: random batches (B 1-3, K 2-6, H and W 1-7, sharp to flat, 0-100% valid) obey
  `check_output`; two fresh instances give the same selection for the same input; a
  selector with an empty state_dict gives it again on a second call (no hidden state).
- state: after three batches, state_dict -> torch.save -> torch.load(weights_only=True) ->
  a fresh instance's load_state_dict gives the same state and the same next selection; a
  stateful selector's state changed over those batches; an unknown state key is refused.
  Stateful means state_dict() is non-empty before or after a select call.
- host_reads: two `select(..., checks=DeferredChecks())` calls read nothing on the host
  (`no_host_reads` below) and record no failed check on valid input.
- precision: the selection inside bf16 autocast, and from bf16 probabilities, is the
  selection from their fp32 values: tolerance zero (the label, reliable set and weight are
  identical, weight fp32), since `Selector.select` casts to fp32 and disables autocast
  before any selector code runs.
- speed: time per call at SPEED_SHAPE against `fixed`, timed round-robin in the same
  process on one thread (the fastest call of each); fails above SPEED_LIMIT times `fixed`
  (a generous bound: it catches per-pixel Python loops, about 200x, not slow kernels: the
  slowest built-in, 100 Sinkhorn iterations, is about 44x). The ratio is reported either way.

`check_output` is the contract of one `Selection` (bench/contract/selection.py): label
int64, weight float32, reliable bool, all (B, H, W); weight finite in [0, 1] and exactly
0 where not valid; reliable within valid with weight > 0; label in [0, K) and, unless the
selector runs stochastic passes (mc_passes > 0: it labels with their mean), the argmax
of probs; negatives, when given, bool (B, K, H, W) and within valid.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from bench.contract import (
    CONTEXT_KEYS,
    DeferredChecks,
    Selection,
    Selector,
    available_selectors,
    build_context,
    get_selector,
    selector_class,
    selector_origin,
    selector_params,
)
from bench.tools.host_reads import HostReadError, no_host_reads

REFERENCE = "fixed"  # the speed reference: one threshold on the confidence
# B, K, H, W: small, so the check takes a second. Few classes and 16k pixels: vectorised work
# grows with K, a per-pixel Python loop does not, and per-call overhead is amortised. Measured
# on 2 CPU cores (one thread): a loop with one comparison per pixel is 200x `fixed`, the
# slowest built-in (100 Sinkhorn iterations) 44x; the limit lies 2x from each.
SPEED_SHAPE = (4, 4, 64, 64)
SPEED_LIMIT = 100.0  # times the reference's time per call
SPEED_BUDGET_S = 0.5  # seconds of round-robin timing per check (at least 5 calls each)
SMALL_PASSES = 4  # stochastic passes for a selector with a `passes` parameter (keeps checks quick)


class ContractError(AssertionError):
    """A selector broke its contract: the message names it, the check and the case."""

    def __init__(self, selector: str, check: str, reason: str):
        super().__init__(f"selector '{selector}' failed check '{check}': {reason}")
        self.selector, self.check, self.reason = selector, check, reason


# --------------------------------------------------------------------------------------
# Building selectors, inputs and context as the trainer does
# --------------------------------------------------------------------------------------
def quick_params(name: str) -> dict[str, Any]:
    """Parameters the checks build `name` with: its defaults, except at most SMALL_PASSES
    stochastic passes when it has a `passes` parameter."""
    passes = selector_params(name).get("passes")
    if isinstance(passes, int) and not isinstance(passes, bool) and passes > SMALL_PASSES:
        return {"passes": SMALL_PASSES}
    return {}


def build(name: str, num_classes: int) -> Selector:
    return get_selector(name, num_classes=num_classes, **quick_params(name))


def context_for(selector: Selector, probs: Tensor, seed: int = 0) -> dict[str, Any]:
    """The context `selector` declares, built as the trainer builds it: everything is
    offered, `build_context` takes what the selector asks for. The same seed gives the
    same context."""
    B, K, H, W = probs.shape
    g = torch.Generator().manual_seed(seed)
    base = torch.log(probs.float().clamp(min=1e-6))
    available = {
        "mc_logits": lambda passes: base + 0.05 * torch.randn(passes, B, K, H, W, generator=g),
        "labeled_probs": (torch.randn(B, K, H, W, generator=g) * 3).softmax(1),
        "labeled_target": torch.randint(0, K, (B, H, W), generator=g),
        "progress": 0.3,
    }
    return build_context(selector, available)


def random_batch(seed: int, shape: tuple[int, int, int, int], scale: float = 3.0, p_valid: float = 0.9) -> tuple[Tensor, Tensor]:
    """Softmax of Gaussian logits times `scale` (0: uniform; 12: nearly one-hot) and a
    valid mask with about `p_valid` of the pixels."""
    B, K, H, W = shape
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(B, K, H, W, generator=g) * scale).softmax(1)
    valid = torch.rand(B, H, W, generator=g) < p_valid
    return probs, valid


def property_batches(count: int = 24, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """The batches `check_properties` uses by default: every sharpness x valid share,
    with random sizes (what tests/test_contract.py draws with hypothesis)."""
    g = torch.Generator().manual_seed(seed)
    kinds = [(s, p) for s in (0.0, 0.5, 3.0, 12.0) for p in (0.0, 0.3, 1.0)]
    out = []
    for i in range(count):
        B, K, H, W = (int(torch.randint(lo, hi + 1, (), generator=g)) for lo, hi in ((1, 3), (2, 6), (1, 7), (1, 7)))
        scale, p_valid = kinds[i % len(kinds)]
        out.append(random_batch(seed * 1000 + i, (B, K, H, W), scale, p_valid))
    return out


def stochastic_labels(selector: Selector) -> bool:
    """A selector that runs stochastic passes labels with their mean, not argmax(probs)."""
    return selector.mc_passes > 0


def is_stateful(selector: Selector) -> bool:
    """Whether `selector` keeps state across calls (its state_dict is not empty). Ask before
    and after a select call: a selector may create its state lazily."""
    return bool(selector.state_dict())


# --------------------------------------------------------------------------------------
# Failing with a message that says what and why
# --------------------------------------------------------------------------------------
def _expect(condition: Any, message: str) -> None:
    if not condition:
        raise AssertionError(message)


@contextlib.contextmanager
def _case(description: str) -> Iterator[None]:
    """Prefix a failure inside the block with the case it happened in; an exception from
    the selector is a failure of the case too."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{description}: {exc}") from exc
    except Exception as exc:
        raise AssertionError(f"{description}: raised {type(exc).__name__}: {exc}") from exc


def _contract_check(check: str) -> Callable:
    """Make `fn(name, ...)` raise ContractError naming the selector and the check."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(name: str, *args, **kwargs):
            try:
                return fn(name, *args, **kwargs)
            except ContractError:
                raise
            except AssertionError as exc:
                raise ContractError(name, check, str(exc)) from exc
            except Exception as exc:
                raise ContractError(name, check, f"raised {type(exc).__name__}: {exc}") from exc

        wrapper.check = check
        return wrapper

    return decorate


def _shape(batch: tuple[Tensor, Tensor]) -> str:
    return "x".join(map(str, batch[0].shape))


# --------------------------------------------------------------------------------------
# One selection
# --------------------------------------------------------------------------------------
def check_output(out: Any, probs: Tensor, valid: Tensor, labels_from_probs: bool = True) -> None:
    """The contract of one `Selection` for `probs` (B, K, H, W) and `valid` (B, H, W);
    raises AssertionError saying what is wrong."""
    _expect(isinstance(out, Selection), f"select returned {type(out).__name__}, not a bench.contract.Selection")
    B, K, H, W = probs.shape
    for field, dtype in (("label", torch.int64), ("weight", torch.float32), ("reliable", torch.bool)):
        value = getattr(out, field)
        _expect(isinstance(value, Tensor), f"{field} is {type(value).__name__}, not a tensor")
        _expect(value.dtype == dtype, f"{field} has dtype {value.dtype}, the contract says {dtype}")
        _expect(tuple(value.shape) == (B, H, W), f"{field} has shape {tuple(value.shape)}, the contract says (B, H, W) = {(B, H, W)}")
    weight, reliable, label = out.weight, out.reliable, out.label
    invalid = ~valid
    # Each message is built only on failure (its numbers read the offending pixels).
    bad = ~torch.isfinite(weight)
    if bad.any():
        raise AssertionError(f"weight is NaN or infinite at {int(bad.sum())} pixels")
    bad = (weight < 0) | (weight > 1)
    if bad.any():
        raise AssertionError(f"weight leaves [0, 1] at {int(bad.sum())} pixels (range {float(weight.min()):.4g} to {float(weight.max()):.4g})")
    bad = invalid & (weight != 0)
    if bad.any():
        raise AssertionError(
            f"weight is nonzero outside valid at {int(bad.sum())} of {int(invalid.sum())} invalid pixels "
            f"(largest {float(weight[bad].max()):.4g}); it must be exactly 0 where valid is False"
        )
    bad = reliable & invalid
    if bad.any():
        raise AssertionError(f"reliable is True at {int(bad.sum())} pixels outside valid; reliable must lie within valid")
    bad = reliable & (weight <= 0)
    if bad.any():
        raise AssertionError(f"reliable is True at {int(bad.sum())} pixels whose weight is 0; a reliable pixel must have weight > 0")
    bad = (label < 0) | (label >= K)
    if bad.any():
        raise AssertionError(f"label leaves [0, K) = [0, {K}) at {int(bad.sum())} pixels (range {int(label.min())} to {int(label.max())})")
    if labels_from_probs:
        bad = label != probs.argmax(1)
        if bad.any():
            raise AssertionError(
                f"label differs from argmax(probs) at {int(bad.sum())} of {bad.numel()} pixels "
                "(a selector without stochastic passes, mc_passes = 0, labels with the teacher's argmax)"
            )
    if out.negatives is not None:
        neg = out.negatives
        if not (isinstance(neg, Tensor) and neg.dtype == torch.bool and tuple(neg.shape) == (B, K, H, W)):
            raise AssertionError(f"negatives must be a bool tensor of shape (B, K, H, W) = {(B, K, H, W)}, got {_describe(neg)}")
        bad = neg.any(1) & invalid
        if bad.any():
            raise AssertionError(f"negatives name a class at {int(bad.sum())} pixels outside valid")


def _same_selection(a: Selection, b: Selection) -> str | None:
    """None when `a` and `b` are identical, else what differs."""
    for field in ("label", "weight", "reliable", "negatives"):
        x, y = getattr(a, field), getattr(b, field)
        if x is None and y is None:
            continue
        if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
            return f"{field} differs in kind ({_describe(x)} vs {_describe(y)})"
        if not torch.equal(x, y):
            differ = x != y
            extra = f", largest difference {float((x.float() - y.float()).abs().max()):.3g}" if x.is_floating_point() else ""
            return f"{field} differs at {int(differ.sum())} of {differ.numel()} entries{extra}"
    return None


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"{obj.dtype} tensor of shape {tuple(obj.shape)}"
    return type(obj).__name__


# --------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------
@_contract_check("registry")
def check_registry(name: str) -> str:
    registered = available_selectors()
    _expect(name in registered, f"not registered in the entry-point group cslbench.selectors (registered: {', '.join(registered)})")
    cls = selector_class(name)
    origin = selector_origin(name)
    module = inspect.getmodule(cls)
    doc = (cls.__doc__ or (module.__doc__ if module else None) or "").strip()
    _expect(doc, f"{cls.__qualname__} has no docstring and neither has its module: `cslbench selectors` has nothing to show")
    params = selector_params(name)
    missing = [p for p, default in params.items() if default is inspect.Parameter.empty]
    _expect(not missing, f"parameters {missing} have no default: every parameter needs one, so `selector={name}` alone runs")
    sel = get_selector(name, num_classes=3)
    _expect(type(sel) is cls, f"get_selector built a {type(sel).__name__}, not the registered {cls.__qualname__}")
    _expect(sel.name == name, f"the instance calls itself '{sel.name}', registered as '{name}'")
    try:
        stored = sel.params()
    except AttributeError as exc:
        raise AssertionError(f"params() fails ({exc}): keep every constructor argument as an attribute of the same name") from exc
    _expect(set(stored) == set(params), f"params() gives {sorted(stored)}, the constructor takes {sorted(params)}")
    with _case("rebuilding from params()"):
        get_selector(name, num_classes=3, **stored)
    repr(sel)
    try:
        get_selector(name, num_classes=3, no_such_parameter=1)
    except ValueError as exc:
        _expect(f"selector '{name}'" in str(exc) and "no_such_parameter" in str(exc),
                f"the error for an unknown parameter does not name the selector and the parameter: {exc}")
    else:
        raise AssertionError("an unknown parameter (no_such_parameter=1) was accepted")
    unknown = [k for k in sel.context_keys if k not in CONTEXT_KEYS]
    _expect(not unknown, f"context_keys {unknown} are not context a trainer offers ({list(CONTEXT_KEYS)})")
    undeclared = [k for k in sel.required_context if k not in sel.context_keys]
    _expect(not undeclared, f"required_context {undeclared} is not in context_keys {list(sel.context_keys)}, so it is never passed")
    passes = sel.mc_passes
    _expect(isinstance(passes, int) and not isinstance(passes, bool) and passes >= 0, f"mc_passes must be an int >= 0, got {passes!r}")
    _expect(passes == 0 or "mc_logits" in sel.context_keys,
            f"mc_passes = {passes} but 'mc_logits' is not in context_keys: the trainer would run passes nobody reads")
    return f"from {origin}" + ("" if (cls.__doc__ or "").strip() else "; documented by its module's docstring only")


@_contract_check("errors")
def check_errors(name: str) -> str:
    K = 3
    sel = build(name, K)
    probs = torch.full((2, K, 4, 4), 1.0 / K)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    ctx = context_for(sel, probs)

    def poked(index, value):
        p = probs.clone()
        p[index] = value
        return p

    cases = [
        ("probs containing NaN", poked((1, 2, 3, 3), float("nan")), valid, {}, "NaN or Inf"),
        ("probs containing +Inf", poked((0, 0, 0, 0), float("inf")), valid, {}, "NaN or Inf"),
        ("probs containing -Inf", poked((0, 1, 2, 0), float("-inf")), valid, {}, "NaN or Inf"),
        ("integer probs", torch.ones(2, K, 4, 4, dtype=torch.int64), valid, {}, "floating-point"),
        ("probs of rank 3", probs[0], valid[0], {}, "rank 4"),
        ("valid of the wrong shape", probs, valid[:, :3], {}, "valid must have shape"),
        ("float valid", probs, valid.float(), {}, "bool"),
        ("uint8 valid", probs, valid.to(torch.uint8), {}, "bool"),
        ("probs with K=2 for num_classes=3", probs[:, :2] * 1.5, valid, {}, "K=2 classes but the selector was built with num_classes=3"),
        ("probs with K=1", torch.ones(2, 1, 4, 4), valid, {}, "K >= 2"),
        ("probs that sum to 3", probs * 3.0, valid, {}, "sum to 1"),
        ("unknown context 'gt' (unlabeled ground truth)", probs, valid, {"gt": torch.zeros(2, 4, 4, dtype=torch.int64)}, "unknown context"),
    ]
    for key in sel.required_context:
        cases.append((f"no required context '{key}'", probs, valid, {key: None}, "needs context"))
    for what, p, v, extra, pattern in cases:
        _expect_value_error(name, lambda: sel.select(p, v, **{**ctx, **extra}), pattern, what)
    _expect_value_error(name, lambda: get_selector(name, num_classes=1, **quick_params(name)), "num_classes must be an integer >= 2", "num_classes=1")
    return f"{len(cases) + 1} bad inputs refused"


def _expect_value_error(name: str, call: Callable[[], Any], pattern: str, what: str) -> None:
    try:
        call()
    except ValueError as exc:
        message = str(exc)
        _expect(f"selector '{name}'" in message, f"{what}: the ValueError does not name the selector: {message!r}")
        _expect(re.search(pattern, message), f"{what}: the ValueError does not say {pattern!r}: {message!r}")
        return
    except Exception as exc:
        raise AssertionError(f"{what}: raised {type(exc).__name__} ({exc}) instead of a ValueError naming the selector") from exc
    raise AssertionError(f"{what}: accepted without an error (expected a ValueError naming the selector)")


DEGENERATE_CASES = ("no_valid_in_one_image", "no_valid_at_all", "one_valid", "identical", "uniform", "one_hot", "1x1", "1x1_invalid")


def degenerate_batch(case: str, K: int) -> tuple[Tensor, Tensor]:
    B, H, W = 2, 5, 4
    if case.startswith("1x1"):
        B, H, W = 1, 1, 1
    g = torch.Generator().manual_seed(1)
    probs = (torch.randn(B, K, H, W, generator=g) * 2).softmax(1)
    valid = torch.ones(B, H, W, dtype=torch.bool)
    if case == "no_valid_in_one_image":
        valid[0] = False
    elif case in ("no_valid_at_all", "1x1_invalid"):
        valid[:] = False
    elif case == "one_valid":
        valid[:] = False
        valid[1, 2, 3] = True
    elif case == "identical":
        probs[:] = probs[:, :, :1, :1]
    elif case == "uniform":
        probs = torch.full((B, K, H, W), 1.0 / K)
    elif case == "one_hot":
        probs = torch.nn.functional.one_hot(torch.randint(0, K, (B, H, W), generator=g), K).permute(0, 3, 1, 2).float()
    elif case != "1x1":
        raise ValueError(f"unknown degenerate case {case!r}; cases: {DEGENERATE_CASES}")
    return probs, valid


@_contract_check("degenerate")
def check_degenerate(name: str, cases: Iterable[str] = DEGENERATE_CASES, ks: Iterable[int] = (2, 5)) -> str:
    count = 0
    for K in ks:
        for case in cases:
            probs, valid = degenerate_batch(case, K)
            with _case(f"{case} (shape {_shape((probs, valid))})"):
                sel = build(name, K)
                out = sel.select(probs, valid, **context_for(sel, probs))
                check_output(out, probs, valid, labels_from_probs=not stochastic_labels(sel))
            count += 1
    return f"{count} cases"


@_contract_check("properties")
def check_properties(name: str, batches: Iterable[tuple[Tensor, Tensor]] | None = None) -> str:
    batches = property_batches() if batches is None else list(batches)
    stateless = 0
    for i, (probs, valid) in enumerate(batches):
        K = probs.shape[1]
        with _case(f"batch {i} (shape {_shape((probs, valid))}, {int(valid.sum())} of {valid.numel()} valid)"):
            a, b = build(name, K), build(name, K)
            stateful = is_stateful(a)
            out = a.select(probs, valid, **context_for(a, probs))
            check_output(out, probs, valid, labels_from_probs=not stochastic_labels(a))
            differ = _same_selection(out, b.select(probs, valid, **context_for(b, probs)))
            _expect(differ is None, f"two fresh instances given the same input disagree: {differ} (selection must be deterministic)")
            if not (stateful or is_stateful(a)):
                stateless += 1
                differ = _same_selection(out, a.select(probs, valid, **context_for(a, probs)))
                _expect(differ is None, f"a selector with an empty state_dict selected differently the second time for the same input: {differ} "
                        "(state it keeps must be in state_dict, or checkpoints lose it)")
    return f"{len(batches)} random batches" + (", repeat calls identical (stateless)" if stateless == len(batches) else "")


def _same_state(x: Any, y: Any) -> bool:
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            return bool(((x == y) | (x.isnan() & y.isnan())).all())
        return torch.equal(x, y)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same_state(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same_state(a, b) for a, b in zip(x, y))
    return x == y or (x != x and y != y)  # NaN == NaN here


@_contract_check("state")
def check_state(name: str) -> str:
    K = 4
    seq = [random_batch(100 + i, (2, K, 6, 6)) for i in range(4)]
    a = build(name, K)
    fresh = a.state_dict()
    for i, (probs, valid) in enumerate(seq[:3]):
        with _case(f"batch {i}"):
            a.select(probs, valid, **context_for(a, probs, seed=i))
    state = a.state_dict()
    stateful = bool(fresh) or bool(state)
    _expect(set(fresh) == set(state), f"state_dict keys changed with select: {sorted(fresh)} before, {sorted(state)} after; a fresh instance cannot load them")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        loaded = torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise AssertionError(f"its state does not load with torch.load(weights_only=True): {type(exc).__name__}: {str(exc).splitlines()[0]} "
                             "(keep tensors, numbers, strings and plain containers in state_dict)") from exc
    b = build(name, K)
    with _case("load_state_dict into a fresh instance"):
        b.load_state_dict(loaded)
    _expect(_same_state(b.state_dict(), state), "a fresh instance's state_dict after load_state_dict differs from the state it was given")
    probs, valid = seq[3]
    ctx = context_for(a, probs, seed=5)
    differ = _same_selection(a.select(probs, valid, **ctx), b.select(probs, valid, **context_for(b, probs, seed=5)))
    _expect(differ is None, f"after the round trip the next selection differs from the original's: {differ}")
    if stateful:
        changed = [k for k in state if not _same_state(fresh[k], state[k])]
        _expect(changed, f"state_dict ({sorted(state)}) did not change over 3 batches, so the round trip proves nothing "
                "(state that never changes is configuration, not state)")
    try:
        build(name, K).load_state_dict({**loaded, "no_such_key": torch.zeros(())})
    except ValueError as exc:
        _expect(f"selector '{name}'" in str(exc), f"the error for a foreign state key does not name the selector: {exc}")
    except Exception as exc:
        raise AssertionError(f"a state with an unknown key raised {type(exc).__name__} ({exc}) instead of a ValueError naming the selector") from exc
    else:
        raise AssertionError("load_state_dict accepted a state with an unknown key ('no_such_key'); call Selector.load_state_dict (super) first")
    return f"stateful ({', '.join(sorted(state))})" if stateful else "stateless (empty state_dict)"


@_contract_check("host_reads")
def check_host_reads(name: str) -> str:
    K = 5
    probs, valid = random_batch(7, (2, K, 8, 8))
    sel = build(name, K)
    checks = DeferredChecks()
    for step in range(2):  # the second call sees the state the first left
        ctx = context_for(sel, probs, seed=step)  # the trainer's work (MC passes), outside the region
        checks.iteration = step
        try:
            with no_host_reads():
                sel.select(probs, valid, checks=checks, **ctx)
        except HostReadError as exc:
            raise AssertionError(f"call {step + 1} of select(..., checks=DeferredChecks()): {exc}; "
                                 "keep the computation on the device (torch.where, masks) and value checks in self._check(bad, message)") from exc
    failed = checks.failures()
    _expect(not failed, f"valid input failed its deferred checks: {'; '.join(f.message for f in failed)}")
    return "2 calls with DeferredChecks, nothing read on the host"


@_contract_check("precision")
def check_precision(name: str) -> str:
    K = 6
    probs, valid = random_batch(0, (2, K, 24, 24), p_valid=0.9)
    probs16 = probs.to(torch.bfloat16)

    def twice(p: Tensor, autocast: bool) -> Selection:
        sel = build(name, K)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for step in range(2):  # a second call sees the state the first left
                out = sel.select(p, valid, **context_for(sel, p.float(), seed=step))
        return out

    reference = twice(probs, autocast=False)
    inside = twice(probs, autocast=True)
    _expect(inside.weight.dtype == torch.float32, f"inside bf16 autocast the weight is {inside.weight.dtype}, not float32")
    differ = _same_selection(reference, inside)
    _expect(differ is None, f"inside bf16 autocast (CPU) the selection is not the fp32 one (tolerance: identical): {differ}")
    from16 = twice(probs16, autocast=False)
    differ = _same_selection(twice(probs16.float(), autocast=False), from16)
    _expect(differ is None, f"bf16 probs select differently from their fp32 cast (tolerance: identical): {differ}")
    flipped = (reference.reliable != from16.reliable)[valid]
    return (f"identical under bf16 autocast and from bf16 probs (rounding the probs to bf16 itself moves "
            f"{100 * float(flipped.float().mean()):.1f}% of valid pixels in or out of the reliable set)")


@dataclass(frozen=True)
class Speed:
    ms: float  # fastest call, one thread
    reference_ms: float  # the same for `fixed`
    ratio: float
    shape: tuple[int, int, int, int]

    def __str__(self) -> str:
        return (f"{self.ratio:.1f}x {REFERENCE} ({self.ms:.3f} ms vs {self.reference_ms:.3f} ms per call at "
                f"{'x'.join(map(str, self.shape))}; limit {SPEED_LIMIT:g}x)")


def time_against_reference(name: str, shape: tuple[int, int, int, int] = SPEED_SHAPE, budget_s: float = SPEED_BUDGET_S) -> Speed:
    """Time per select call of `name` and of `fixed` on the same input, timed round-robin
    in this process on one thread, each the fastest of its calls.

    One thread and the fastest call: on a machine shared with other work, a multi-threaded
    call waits for a descheduled thread and a slow call is interrupted more often than a
    fast one, which made the median ratio of a 20 ms selector swing from 30x to 360x between
    two runs on a busy 2-core machine; the fastest single-thread call is what the selector
    costs."""
    from bench.tools.kernels import _interleaved_times, available_context, synthetic_inputs

    probs, valid = synthetic_inputs(shape, "cpu")
    sel, ref = build(name, shape[1]), get_selector(REFERENCE, num_classes=shape[1])
    ctx = build_context(sel, available_context(probs))  # the passes are computed once, untimed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = _interleaved_times(
            [(REFERENCE, lambda: ref.select(probs, valid)), (name, lambda: sel.select(probs, valid, **ctx))],
            torch.device("cpu"), min_rounds=5, budget_s=budget_s,
        )
    finally:
        torch.set_num_threads(threads)
    ms, ref_ms = (min(times[k]) * 1e3 for k in (name, REFERENCE))
    return Speed(ms, ref_ms, ms / ref_ms, tuple(shape))


@_contract_check("speed")
def check_speed(name: str) -> str:
    speed = time_against_reference(name)
    _expect(speed.ratio <= SPEED_LIMIT, f"{speed}: above the limit")
    return str(speed)


CHECKS: dict[str, Callable[[str], str]] = {
    fn.check: fn
    for fn in (check_registry, check_errors, check_degenerate, check_properties, check_state, check_host_reads, check_precision, check_speed)
}


@dataclass(frozen=True)
class CheckResult:
    selector: str
    check: str
    passed: bool
    detail: str  # what was checked (passed), or what failed and why

    def __str__(self) -> str:
        return f"selector '{self.selector}' {'passed' if self.passed else 'failed'} check '{self.check}': {self.detail}"


def run_checks(name: str, checks: Iterable[str] | None = None) -> list[CheckResult]:
    """Every check (or those named, in CHECKS order) on `name`; a failure is a result."""
    unknown = [c for c in checks or () if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; checks: {', '.join(CHECKS)}")
    results = []
    for check, fn in CHECKS.items():
        if checks is not None and check not in checks:
            continue
        try:
            results.append(CheckResult(name, check, True, fn(name)))
        except ContractError as exc:
            results.append(CheckResult(name, check, False, exc.reason))
    return results


def check_all(name: str) -> None:
    """Every check on `name`; raises AssertionError listing every failure."""
    failed = [str(r) for r in run_checks(name) if not r.passed]
    if failed:
        raise AssertionError("\n".join(failed))
