"""Name -> factory registries for detectors and backbones (no subclass scanning, no eval)."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")

_DETECTORS: dict[str, type] = {}
_BACKBONES: dict[str, Callable] = {}


def register_detector(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a detector available to ``create_detector(name)``."""

    def wrap(cls: type[T]) -> type[T]:
        if name in _DETECTORS and _DETECTORS[name] is not cls:
            raise ValueError(f"detector {name!r} is already registered by {_DETECTORS[name].__name__}")
        _DETECTORS[name] = cls
        cls.name = name
        return cls

    return wrap


def register_backbone(name: str) -> Callable[[Callable], Callable]:
    """Function decorator: ``fn(**params) -> Backbone`` becomes ``create_backbone(name)``."""

    def wrap(fn: Callable) -> Callable:
        _BACKBONES[name] = fn
        return fn

    return wrap


def _ensure_loaded() -> None:
    # Importing the packages runs their @register_* decorators.
    from clad import backbones, detectors  # noqa: F401


def list_detectors() -> list[str]:
    _ensure_loaded()
    return sorted(_DETECTORS)


def detector_class(name: str) -> type:
    _ensure_loaded()
    if name not in _DETECTORS:
        raise KeyError(f"unknown detector {name!r}; available: {', '.join(sorted(_DETECTORS))}")
    return _DETECTORS[name]


def create_detector(name: str, **params):
    """Build a detector by its registry name; unknown parameters are an error naming the key."""
    return detector_class(name)(**params)


def list_backbones() -> list[str]:
    _ensure_loaded()
    return sorted(_BACKBONES)


def create_backbone(spec: str, **params):
    """Build a backbone from ``name`` or ``name:argument`` (e.g. ``clip:/path/to/hf_folder``)."""
    _ensure_loaded()
    name, _, arg = spec.partition(":")
    if name not in _BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(sorted(_BACKBONES))}")
    if arg:
        return _BACKBONES[name](arg, **params)
    return _BACKBONES[name](**params)
