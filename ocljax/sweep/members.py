"""The member axis: (grid point x seed) pairs, and parsing of ``--grid`` / ``--set`` values."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from ocljax.errors import ConfigError


class Member(NamedTuple):
    """One run of a sweep: its seed and its traced hyperparameters."""

    seed: int
    hparams: dict[str, float]


def parse_value(key: str, text: str, like: Any) -> Any:
    """Parse ``text`` as the type of the default ``like`` (bool, int, float or str)."""
    try:
        if isinstance(like, bool):
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return low in ("true", "1", "yes")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        raise ConfigError(
            f"bad value {text!r} for {key}: expected {type(like).__name__}"
        ) from None
    return text


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    """Split ``key=value``; ``ConfigError`` naming the flag otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ConfigError(f"{flag} expects key=value, got {text!r}")
    return key.strip(), value.strip()


def expand(
    grid: Mapping[str, Sequence[float]], base: Mapping[str, float], seeds: Sequence[int]
) -> list[Member]:
    """Members of a sweep: every grid point (in the order given) times every seed.

    Member ``g * len(seeds) + i`` is grid point ``g`` with seed ``seeds[i]``; every grid point
    uses the same seeds, hence the same initialisations and sample orders (common random
    numbers).
    """
    keys = list(grid)
    points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(
        *(grid[k] for k in keys))] or [{}]
    return [Member(int(s), {**base, **p}) for p in points for s in seeds]
