"""Name -> object registries: detectors, visual backbones, text encoders and dataset schemes.

Each kind has one ``Registry``, filled on first use from ``clad.builtins`` (lazy ``"module:attr"`` references,
so listing names imports no model code) and from the entry points of its group. That is how another package
adds its own, e.g. in its ``pyproject.toml``::

    [project.entry-points."clad.detectors"]
    my_detector = "my_package.detector:MyDetector"

The groups are ``clad.detectors`` (a ``Detector`` subclass), ``clad.backbones`` (``fn(argument?, **params) ->
Backbone``), ``clad.text_encoders`` (``fn(argument or None) -> TextEncoder``) and ``clad.datasets``
(a ``clad.data.DatasetScheme``). Nothing registers itself on import.
"""
from __future__ import annotations

import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Generic, TypeVar

from clad import builtins
from clad.errors import PluginError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind. An entry is the object itself or a reference loaded on first ``get``."""

    def __init__(self, kind: str, group: str, builtin: dict[str, str],
                 on_load: Callable[[str, T], None] | None = None):
        self.kind, self.group = kind, group
        self._builtin = builtin
        self._on_load = on_load  # called once per entry with (name, object) when the object is first held
        self._entries: dict[str, T | EntryPoint] = {}
        self._plugins: set[str] = set()  # names that came from entry points
        self._filled = False

    def register(self, name: str, obj: T | str | None = None):
        """``register(name, obj)`` or ``@register(name)``; ``obj`` may be a ``"module:attr"`` reference.

        A name already taken by another object is an error.
        """
        if obj is None:
            def wrap(o: T) -> T:
                self.register(name, o)
                return o

            return wrap
        self._fill()
        entry = EntryPoint(name, obj, self.group) if isinstance(obj, str) else obj
        old = self._entries.get(name)
        if old is not None and not _same(old, entry):
            raise ValueError(f"{self.kind} {name!r} is already registered as {_describe(old)}")
        if old is None:
            self._add(name, entry)
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``, loaded if needed; an ``UnknownNameError`` (a KeyError) listing the
        names if there is none."""
        self._fill()
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, EntryPoint):
            entry = self._add(name, self._load(name, entry))
        return entry

    def create(self, name: str, *args: Any, **kwargs: Any):
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)

    def name_of(self, obj: object) -> str | None:
        """The name ``obj`` is registered under, or None; loads only the entries whose attribute has its name."""
        self._fill()
        for name, entry in list(self._entries.items()):
            if isinstance(entry, EntryPoint) and entry.attr == getattr(obj, "__name__", None):
                try:
                    entry = self.get(name)
                except PluginError:  # another package's broken entry is not this object
                    continue
            if entry is obj:
                return name
        return None

    def names(self) -> list[str]:
        self._fill()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._fill()
        return name in self._entries

    def reload(self) -> None:
        """Forget every entry and read the built-ins and entry points again (e.g. after installing a plugin)."""
        self._entries.clear()
        self._plugins.clear()
        self._filled = False

    def _add(self, name: str, entry: T | EntryPoint):
        if self._on_load is not None and not isinstance(entry, EntryPoint):
            self._on_load(name, entry)
        self._entries[name] = entry
        return entry

    def _fill(self) -> None:
        if self._filled:
            return
        self._filled = True
        for name, ref in self._builtin.items():
            self._entries[name] = EntryPoint(name, ref, self.group)
        for ep in entry_points(group=self.group):
            old = self._entries.get(ep.name)
            if old is None:
                self._entries[ep.name] = ep
                self._plugins.add(ep.name)
            elif not _same(old, ep):  # the same entry point seen twice (one package on sys.path twice) is fine
                warnings.warn(f"{self.group}: entry point {ep.name} = {ep.value} ignored: "
                              f"{ep.name!r} is taken by {_describe(old)}", stacklevel=3)

    def _load(self, name: str, ep: EntryPoint):
        if name not in self._plugins:
            return ep.load()  # a built-in that fails to import is a bug: keep its traceback
        try:
            return ep.load()
        except Exception as e:
            dist = f" of the package {ep.dist.name!r}" if ep.dist is not None else ""
            raise PluginError(f"{self.kind} {name!r} (entry point {ep.value!r}{dist}) failed to load: "
                              f"{type(e).__name__}: {e}") from e


def _same(a, b) -> bool:
    if isinstance(a, EntryPoint) and isinstance(b, EntryPoint):
        return a.value == b.value
    return a is b


def _describe(entry) -> str:
    if isinstance(entry, EntryPoint):
        return repr(entry.value)
    return repr(getattr(entry, "__qualname__", entry))


def _name_detector(name: str, cls: type) -> None:
    # Saved models record the registry name (``Detector.save``), so the class carries it.
    cls.name = name


detectors: Registry[type] = Registry("detector", "clad.detectors", builtins.DETECTORS, on_load=_name_detector)
backbones: Registry[Callable] = Registry("backbone", "clad.backbones", builtins.BACKBONES)
text_encoders: Registry[Callable] = Registry("text encoder", "clad.text_encoders", builtins.TEXT_ENCODERS)
datasets: Registry[Any] = Registry("dataset scheme", "clad.datasets", builtins.DATASETS)


def _split(spec: str) -> tuple[str, str]:
    """``"clip:/path"`` -> ``("clip", "/path")``; ``"minilm"`` -> ``("minilm", "")``."""
    name, _, arg = spec.partition(":")
    return name, arg


# -- detectors ------------------------------------------------------------------------------------------------
def register_detector(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a detector available to ``create_detector(name)`` (sets ``cls.name``)."""
    return detectors.register(name)


def list_detectors() -> list[str]:
    return detectors.names()


def detector_class(name: str) -> type:
    return detectors.get(name)


def create_detector(name: str, **params):
    """Build a detector by its registry name; unknown parameters are an error naming the key."""
    return detector_class(name)(**params)


# -- backbones ------------------------------------------------------------------------------------------------
def register_backbone(name: str) -> Callable[[Callable], Callable]:
    """Function decorator: ``fn(argument?, **params) -> Backbone`` becomes ``create_backbone(name)``."""
    return backbones.register(name)


def list_backbones() -> list[str]:
    return backbones.names()


def create_backbone(spec: str, **params):
    """Build a backbone from ``name`` or ``name:argument`` (e.g. ``clip:/path/to/hf_folder``)."""
    name, arg = _split(spec)
    factory = backbones.get(name)
    return factory(arg, **params) if arg else factory(**params)


# -- text encoders --------------------------------------------------------------------------------------------
def register_text_encoder(name: str) -> Callable[[Callable], Callable]:
    """Function decorator: ``fn(argument or None) -> TextEncoder`` becomes ``create_text_encoder(name)``."""
    return text_encoders.register(name)


def list_text_encoders() -> list[str]:
    return text_encoders.names()


def create_text_encoder(spec: str):
    """Build a text encoder from ``minilm`` or ``clip:PATH`` (in eval mode)."""
    name, arg = _split(spec)
    return text_encoders.get(name)(arg or None).eval()
