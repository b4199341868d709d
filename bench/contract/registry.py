"""Where selectors are found: the entry-point group `cslbench.selectors`, and nothing else.

The built-in selectors are declared in cslbench's own `pyproject.toml` exactly as a
plugin declares its own in its package, so what works for them works for a plugin:

    [project.entry-points."cslbench.selectors"]
    my_threshold = "my_package.module:MyThreshold"

`register_selector` adds a class for this process only (a notebook, a test); inside
`scoped_registry()` the addition is undone when the block ends.
"""

from __future__ import annotations

import contextlib
from importlib.metadata import entry_points
from typing import Any, Callable, Iterator

from bench.contract.selection import Selector, constructor_params
from bench.suggest import did_you_mean

ENTRY_POINT_GROUP = "cslbench.selectors"

_registry: dict[str, type[Selector]] = {}
_origins: dict[str, str] = {}  # name -> "module:Class (distribution)" or "registered in this process"
_loaded = False


class RegistryError(RuntimeError):
    """Two selectors claim one name, or an entry point does not name a Selector."""


def _add(name: str, cls: Any, origin: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Selector)):
        raise RegistryError(f"selector '{name}' ({origin}) is {cls!r}, not a subclass of bench.contract.Selector")
    existing = _registry.get(name)
    if existing is not None and existing is not cls:
        raise RegistryError(f"selector name '{name}' is claimed twice: by {_origins[name]} and by {origin}; rename one")
    cls.name = name
    _registry[name] = cls
    _origins[name] = origin


def _load() -> None:
    global _loaded
    if _loaded:
        return
    found = entry_points(group=ENTRY_POINT_GROUP)
    if not found:
        raise RegistryError(
            f"no selectors in the entry-point group '{ENTRY_POINT_GROUP}': cslbench is not installed in this "
            "environment (run `pip install -e .` in the repository, or `make test`)"
        )
    for ep in found:
        dist = getattr(ep.dist, "name", None) or "?"
        try:
            obj = ep.load()
        except Exception as exc:  # re-raised with the plugin named, never swallowed
            raise ImportError(
                f"selector '{ep.name}' ({ep.value}, from {dist}) in entry-point group '{ENTRY_POINT_GROUP}' failed to import: {exc}"
            ) from exc
        _add(ep.name, obj, f"{ep.value} ({dist})")
    _loaded = True


def register_selector(name: str) -> Callable[[type[Selector]], type[Selector]]:
    """Class decorator: make a `Selector` subclass available as `get_selector(name)` in this
    process. A package's selectors belong in its entry points instead."""

    def decorate(cls: type[Selector]) -> type[Selector]:
        _load()
        _add(name, cls, f"{cls.__module__}:{cls.__qualname__} (registered in this process)")
        return cls

    return decorate


@contextlib.contextmanager
def scoped_registry() -> Iterator[None]:
    """A registry for the block: the entry points are read afresh when it is first used
    (a package installed since is found), selectors registered inside are gone after it."""
    global _loaded
    saved, saved_origins, saved_loaded = dict(_registry), dict(_origins), _loaded
    _registry.clear(), _origins.clear()
    _loaded = False
    try:
        yield
    finally:
        _registry.clear(), _registry.update(saved)
        _origins.clear(), _origins.update(saved_origins)
        _loaded = saved_loaded


def available_selectors() -> list[str]:
    _load()
    return sorted(_registry)


def selector_origin(name: str) -> str:
    """Where the selector registered as `name` comes from (its entry point and package)."""
    selector_class(name)
    return _origins[name]


def selector_class(name: str) -> type[Selector]:
    _load()
    if name not in _registry:
        raise ValueError(
            f"unknown selector '{name}'{did_you_mean(name, _registry)}; "
            f"available selectors: {', '.join(sorted(_registry))}"
        )
    return _registry[name]


def check_selector(name: str, params: dict[str, Any]) -> type[Selector]:
    """The class registered as `name`, after checking that it takes every parameter given:
    configs and sweep files are checked with this before anything runs."""
    cls = selector_class(name)
    valid_params = constructor_params(cls)
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


def selector_params(name: str) -> dict[str, Any]:
    """The parameters of a registered selector and their defaults."""
    return constructor_params(selector_class(name))
