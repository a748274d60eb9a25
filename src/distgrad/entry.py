"""The user's code by import path: ``"package.module:attr"`` resolved the same way everywhere.

A model, a data set, a loss, a step function, an optimizer or an LR scheduler that
must reach another process or host (``local`` worker processes, ``distgrad work``,
Ray actors, Spark tasks) travels as its *import path* and JSON keyword arguments,
never as a pickle: every process imports the module and calls the factory itself,
as torchrun and Spark users already install their code on every host.

* :func:`is_path` — does a string name an import path (it has a ``:``)?
* :func:`resolve` — import the module and return the attribute (a ConfigError says
  what is missing: the module, its folder on ``sys.path``, or the attribute).
* :func:`call_factory` — resolve a factory and call it with keyword arguments.
* :func:`ref_of` — the import path of a module-level object, or None (a class defined
  in ``__main__`` of a notebook, ``python -c`` or stdin has none).
* :func:`parse_value` / :func:`parse_kwargs` — ``KEY=VALUE`` options (``--model-arg``,
  ``--data-arg``): JSON values where they parse (numbers, booleans, lists), else strings.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from distgrad.errors import ConfigError

__all__ = ["call_factory", "check_json_args", "interactive_main", "is_path", "parse_kwargs",
           "parse_value", "ref_of", "resolve"]


def is_path(name: object) -> bool:
    """True for an import path ``"package.module:attr"`` (a registered name has no ``:``)."""
    return isinstance(name, str) and ":" in name


def resolve(path: str, kind: str) -> Any:
    """The object ``path`` (``"package.module:attr.sub"``) names; ``kind`` ("model", "data",
    ...) words the error."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise ConfigError(f"a {kind} import path looks like 'package.module:factory', "
                          f"got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise ConfigError(f"cannot import module {module_name!r} of {kind} {path!r}: "
                              f"{exc}. Is its folder on sys.path (PYTHONPATH), on every "
                              f"host?") from None
        raise  # the user's module itself failed to import something: show it
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} "
                              f"({kind} {path!r})")
        obj = getattr(obj, part)
    return obj


def call_factory(path: str, kwargs: Mapping[str, Any] | None, kind: str) -> Any:
    """Resolve ``path`` and call it with ``kwargs`` (a TypeError names the factory)."""
    factory = resolve(path, kind)
    if not callable(factory):
        raise ConfigError(f"{kind} {path!r} is a {type(factory).__name__}, not a factory")
    try:
        return factory(**dict(kwargs or {}))
    except TypeError as exc:
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
            # raised by the call itself (wrong arguments), not inside the factory
            raise ConfigError(f"{kind} factory {path!r}: {exc}") from None
        raise


def interactive_main() -> bool:
    """True when ``__main__`` is a notebook, ``python -c`` or stdin (no file to re-import)."""
    main = sys.modules.get("__main__")
    return main is None or not getattr(main, "__file__", None)


def ref_of(obj: Any) -> str | None:
    """``"module:qualname"`` of a module-level class or function, or None where another
    process could not import it (defined inside a function, or in an interactive
    ``__main__``). A script's ``__main__`` counts as importable: spawned processes re-run
    it (behind its ``if __name__ == "__main__":`` guard)."""
    target = obj if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__")) \
        else type(obj)
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", "")
    if not module or "<locals>" in qualname or "<lambda>" in qualname:
        return None
    if module == "__main__" and interactive_main():
        return None
    return f"{module}:{qualname}"


def parse_value(text: str) -> Any:
    """A ``KEY=VALUE`` option's value: JSON where it parses (``3``, ``1e-3``, ``true``,
    ``[64, 64]``), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_kwargs(items: Iterable[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` (a repeated ``flag``) as keyword arguments."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def check_json_args(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` as a plain dict, refused unless it survives JSON (it travels to workers)."""
    if not isinstance(args, Mapping):
        raise ConfigError(f"{name} must be a mapping of keyword arguments, got "
                          f"{type(args).__name__}")
    try:
        return json.loads(json.dumps(dict(args)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be JSON values (they travel to the workers as "
                          f"JSON): {exc}") from None

