"""Replay memories as pure ``init / add / sample`` functions over explicit states."""

from ocljax.memory import reservoir

__all__ = ["reservoir"]
