"""Replay memories as pure ``init / add / sample`` functions over explicit states."""

from ocljax.memory import balanced, reservoir

__all__ = ["balanced", "reservoir"]
