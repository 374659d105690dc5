"""Errors infersim raises for bad input.

Every error says what is wrong and how to fix it. They all derive from `InfersimError` (a
`ValueError`, so callers that catch bad arguments generically still catch them).
"""

from __future__ import annotations

import difflib


class InfersimError(ValueError):
    """Bad input: the message says what is wrong and how to fix it."""


class ConfigError(InfersimError):
    """A malformed model config, hardware profile, checkpoint or engine argument."""


class UnknownNameError(InfersimError):
    """A model, hardware or policy name that is not known."""


class DoesNotFitError(InfersimError):
    """A model (or plan) that does not fit in the device memory."""


def suggest(name: str, known: list[str] | tuple[str, ...], what: str) -> UnknownNameError:
    """An `UnknownNameError` for `name` that lists close matches (or all choices) from `known`."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"choose one of: {', '.join(known)}"
    return UnknownNameError(f"unknown {what} {name!r}; {hint}")
