"""Option checks shared by the name-based dispatchers.

:func:`~emberfl.data.partition.partition` and :func:`~emberfl.data.datasets.load_dataset` forward
string-keyed options to a function; these helpers make a typo or a forgotten option fail with a
:class:`~emberfl.errors.ConfigError` that lists the valid options, instead of a bare
``TypeError`` from deep inside.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from emberfl.errors import ConfigError

__all__ = ["check_options", "unknown_name"]


def check_options(
    func: Callable[..., Any],
    given: Iterable[str],
    *,
    what: str,
    positional: int = 0,
    exclude: Iterable[str] = (),
) -> None:
    """Raise :class:`ConfigError` for an unknown option or a missing required one.

    Args:
        func: The function the options are forwarded to; its parameters that can be passed
            by keyword are the valid options.
        given: The option names the caller passed.
        what: How to name the target in a message, e.g. ``"partition method 'shards'"``.
        positional: How many leading parameters the dispatcher passes by position.
        exclude: Parameters the dispatcher passes by keyword itself (``seed``, ...).

    Raises:
        ConfigError: An option ``func`` does not take, or a required one that is missing.
    """
    names = set(given)
    skip = set(exclude)
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [
        p
        for p in list(inspect.signature(func).parameters.values())[positional:]
        if p.kind in by_keyword and p.name not in skip
    ]
    valid = [p.name for p in params]
    unknown = sorted(names - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise ConfigError(
            f"{what} does not take option(s) {', '.join(map(repr, unknown))}; "
            f"its options are: {listed}"
        )
    missing = [
        p.name for p in params if p.default is inspect.Parameter.empty and p.name not in names
    ]
    if missing:
        raise ConfigError(f"{what} needs option(s) {', '.join(map(repr, missing))}")


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> ConfigError:
    """Build the :class:`ConfigError` for an unknown ``name`` of ``kind``, listing ``valid``.

    Args:
        kind: What the name names, e.g. ``"partition method"``.
        name: The name the caller gave.
        valid: The names that exist.

    Returns:
        The error, for the caller to raise.
    """
    return ConfigError(f"unknown {kind} {name!r}; choose one of: {', '.join(valid)}")
