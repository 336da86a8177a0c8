"""Defense registry: ``@register_method`` on a dataclass whose fields are its hyper-parameters (STYLE.md).

The CLI builds ``--param key=value`` from the fields, the report records ``asdict(method)``, and defaults live in
one place. Packages add methods through the ``bdsan.methods`` entry-point group.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from ..errors import UsageError

_REGISTRY: dict[str, type] = {}
_DESCRIPTIONS: dict[str, str] = {}
_BUILTINS_LOADED = False


def register_method(name: str, description: str = "") -> Callable[[type], type]:
    """Decorator: add a dataclass with a ``run(model, fit, ctx) -> DefenseResult`` method under ``name``."""

    def add(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"register_method({name!r}): {cls.__name__} must be a dataclass")
        if not callable(getattr(cls, "run", None)):
            raise TypeError(f"register_method({name!r}): {cls.__name__} has no run(model, fit, ctx)")
        _REGISTRY[name] = cls
        _DESCRIPTIONS[name] = description or (cls.__doc__ or name).strip().splitlines()[0]
        cls.method_name = name
        return cls

    return add


def _load_methods() -> None:
    """Import bdsan's own method modules (they register themselves), then plugins."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import importlib

        for module in ("fmp", "trap_replace", "dbr", "unlearn", "finetune"):
            try:
                importlib.import_module(f"{__package__}.{module}")
            except ModuleNotFoundError as exc:  # a method another engineer has not landed yet
                if exc.name != f"{__package__}.{module}":
                    raise
    for ep in entry_points(group="bdsan.methods"):
        if ep.name not in _REGISTRY:
            cls = ep.load()
            _REGISTRY[ep.name] = cls
            _DESCRIPTIONS[ep.name] = (cls.__doc__ or f"plugin {ep.value}").strip().splitlines()[0]


def list_methods() -> dict[str, str]:
    """Name → one-line description."""
    _load_methods()
    return dict(sorted(_DESCRIPTIONS.items()))


def method_class(name: str) -> type:
    _load_methods()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UsageError(f"unknown method {name!r}", hint=f"available methods: {known}")
    return _REGISTRY[name]


def method_fields(name: str) -> dict[str, tuple[Any, Any]]:
    """Hyper-parameter name → (type, default) for ``name``."""
    cls = method_class(name)
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = (hints.get(f.name, Any), default)
    return out


def get_method(name: str, **params: Any):
    """Instantiate method ``name`` with ``params`` (strings from ``--param key=value`` are converted)."""
    cls = method_class(name)
    fields = method_fields(name)
    values = {}
    for key, value in params.items():
        field_name = key.replace("-", "_")
        if field_name not in fields:
            raise UsageError(f"method {name!r} has no parameter {key!r}",
                             hint="parameters: " + ", ".join(f"{k}={d!r}" for k, (_, d) in fields.items()))
        try:
            values[field_name] = convert(value, fields[field_name][0])
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--param {key}={value!r}: {exc}") from None
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"method {name!r}: {exc}") from None


def parse_params(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["a=1", "b=x"]`` → ``{"a": "1", "b": "x"}`` (values stay strings; ``get_method`` converts them)."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {pair!r}: expected key=value")
        params[key.strip().replace("-", "_")] = value.strip()
    return params


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def convert(value: Any, annotation: Any) -> Any:
    """Convert ``value`` (a string from the command line or a config value) to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        blank = value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))
        if blank and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors) or f"cannot convert {value!r}")
    if origin is typing.Literal:
        for arg in args:
            if str(arg) == str(value):
                return arg
        raise ValueError(f"expected one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = args[0] if args else str
        converted = [convert(item.strip() if isinstance(item, str) else item, inner) for item in items if item != ""]
        return tuple(converted) if origin is tuple else converted
    if not isinstance(value, str):
        if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if annotation is Any or isinstance(value, annotation if isinstance(annotation, type) else object):
            return value
        raise TypeError(f"expected {getattr(annotation, '__name__', annotation)}, got {type(value).__name__}")
    text = value.strip()
    if annotation is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if annotation is int:
        return int(text)
    if annotation is float:
        if "/" in text:  # ratios such as 1/64
            numerator, _, denominator = text.partition("/")
            return float(numerator) / float(denominator)
        return float(text)
    if annotation in (str, Any):
        return text
    raise TypeError(f"cannot convert {text!r} to {annotation}")
