"""The selector contract: what a selector receives and returns, how it is registered and
found, the confidence moments it may use, and the metrics that judge a selection.

Imports only torch, the foundation modules (`bench.labels`, `bench.suggest`) and itself:
a selector written against it needs nothing of the harness.
"""

from bench.contract.checks import CheckFailure, DeferredChecks
from bench.contract.confidence import ClassMoments, class_moments
from bench.contract.registry import (
    ENTRY_POINT_GROUP,
    RegistryError,
    available_selectors,
    check_selector,
    get_selector,
    register_selector,
    scoped_registry,
    selector_class,
    selector_origin,
    selector_params,
)
from bench.contract.selection import (
    CONTEXT_KEYS,
    Selection,
    Selector,
    build_context,
    hard_selection,
    masked_mean,
    soft_selection,
)

__all__ = [
    "CONTEXT_KEYS", "ENTRY_POINT_GROUP", "CheckFailure", "ClassMoments", "DeferredChecks", "RegistryError", "Selection",
    "Selector", "available_selectors", "build_context", "check_selector", "class_moments", "get_selector",
    "hard_selection", "masked_mean", "register_selector", "scoped_registry", "selector_class", "selector_origin",
    "selector_params", "soft_selection",
]
