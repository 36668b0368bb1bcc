"""User-facing errors: one clear message, non-zero exit, no traceback (see ``ocljax.cli``)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OCLError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class ConfigError(OCLError):
    """An unknown learner, dataset or setting, or an impossible combination of sizes."""


class DataError(OCLError):
    """A data file that is missing, corrupt, or a dataset that cannot be obtained."""


def did_you_mean(value, choices: Iterable) -> str:
    """`` (did you mean 'x'?)`` when ``value`` looks like a typo of one or two of ``choices``,
    else ``""``."""
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""


def unknown_choice(what: str, value, choices: Iterable) -> str:
    """The message for an unknown ``what`` (``"learner"``, ``"dataset"``, ...): the value, a
    suggestion when it looks like a typo, and every choice."""
    choices = [str(c) for c in choices]
    return f"unknown {what} {value!r}{did_you_mean(value, choices)}; choose one of " \
           f"{', '.join(choices)}"


def require_positive(settings, *names: str) -> None:
    """``ConfigError`` naming the first of the integer settings ``names`` of ``settings`` (a
    config dataclass) that is below 1."""
    for name in names:
        value = getattr(settings, name)
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


class Interrupted(Exception):  # noqa: N818 - a stop request, not a failure
    """A run stopped on request (SIGINT / SIGTERM) after writing a final checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
