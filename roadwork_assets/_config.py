"""Dagster config classes generated from the core config dataclasses (one source of defaults).

Every field of the listed dataclasses becomes a typed launchpad field with the core default and the
core description (``roadwork_core.config.knob``); tuples show as lists. Fields the asset sets itself
(e.g. ``seed`` from the GPU resource) are excluded by name; asset-only knobs are passed as ``extra``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import dagster as dg
import pydantic
from pydantic.fields import FieldInfo

from roadwork_core.config import describe

_SCALARS = (bool, int, float, str)
_SOURCES: dict[type, tuple[type, ...]] = {}  # generated Config class -> the core dataclasses it came from


def _dagster_type(tp: Any, where: str) -> Any:
    """The annotation Dagster config accepts for a core field type: scalars, Optional, list (from tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS:
        return tp
    if origin is typing.Literal and all(isinstance(a, str) for a in args):
        return tp  # a fixed choice: Dagster checks it before any step runs
    if origin in (types.UnionType, typing.Union) and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return _dagster_type(inner, where) | None
    if origin in (tuple, list) and args and all(a == args[0] for a in args if a is not Ellipsis):
        return list[_dagster_type(args[0], where)]
    raise TypeError(f"{where}: type {tp!r} has no Dagster config form; exclude it or give it a scalar type")


def config_from(
    name: str,
    *sources: type,
    exclude: tuple[str, ...] = (),
    extra: dict[str, tuple[Any, FieldInfo]] | None = None,
    doc: str | None = None,
) -> type[dg.Config]:
    """A ``dg.Config`` subclass whose fields are the fields of ``sources`` (core dataclasses) plus ``extra``."""
    fields: dict[str, tuple[Any, FieldInfo]] = {}
    for cls in sources:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            where = f"{cls.__name__}.{f.name}"
            if f.name in fields:
                raise ValueError(f"{name}: field {f.name!r} is defined by two sources (second: {where})")
            if f.default is dataclasses.MISSING:
                raise TypeError(f"{where} has no plain default; exclude it from {name}")
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            fields[f.name] = (
                _dagster_type(hints[f.name], where),
                pydantic.Field(default, description=describe(f)),
            )
    for key, spec in (extra or {}).items():
        if key in fields:
            raise ValueError(
                f"{name}: extra field {key!r} is also a field of {[s.__name__ for s in sources]}"
            )
        fields[key] = spec
    model = pydantic.create_model(name, __base__=dg.Config, __module__=_caller_module(), **fields)
    model.__doc__ = doc or f"Generated from {', '.join(s.__name__ for s in sources)}."
    _SOURCES[model] = sources
    return model


def check_config(config: dg.Config) -> None:
    """Build the core dataclasses a config value stands for (their `__post_init__` refuses ranges no run can
    use), nested configs too; raises ValueError naming the field. Pydantic constraints ran when `config` was
    built. The IO manager runs this for every op of a run before any step (roadwork_assets.definitions)."""
    from roadwork_core.config import from_mapping

    values = config.model_dump()
    for source in _SOURCES.get(type(config), ()):
        built = from_mapping(source, values)
        if hasattr(built, "check_new"):  # what a new run may not ask for (a saved model still loads)
            built.check_new()
    for name in type(config).model_fields:
        nested = getattr(config, name)
        if isinstance(nested, dg.Config):
            check_config(nested)


def _caller_module() -> str:
    import sys

    return sys._getframe(2).f_globals.get("__name__", __name__)
