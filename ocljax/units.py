"""Human-readable quantities for logs, errors and reports (one definition each)."""

from __future__ import annotations


def _scaled(value: float, scales, unit: str) -> str:
    for prefix, scale in scales:
        if round(abs(value) / scale, 1) >= 1:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def human_flops(value: float) -> str:
    """A FLOP count with an SI prefix, one decimal: ``1.2e9`` -> ``"1.2 GFLOP"``."""
    return _scaled(value, (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)), "FLOP")


def human_bytes(value: float) -> str:
    """A byte count with a binary prefix, one decimal: ``8283750`` -> ``"7.9 MiB"``,
    ``5.06e9`` -> ``"4.7 GiB"``, ``900`` -> ``"900 B"``."""
    return _scaled(value, (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)), "B")


def human_seconds(value: float) -> str:
    """A duration: ``0.25`` -> ``"250 ms"``, ``12.34`` -> ``"12.3 s"``, ``90`` -> ``"1.5 min"``,
    ``5400`` -> ``"1.5 h"``."""
    if abs(value) >= 3600:
        return f"{value / 3600:.1f} h"
    if abs(value) >= 60:
        return f"{value / 60:.1f} min"
    if abs(value) >= 1:
        return f"{value:.1f} s"
    return f"{value * 1e3:.3g} ms"


__all__ = ["human_bytes", "human_flops", "human_seconds"]
