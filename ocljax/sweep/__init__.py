"""Sweeps: the member axis (seeds x hyperparameter grid) and its placement on devices."""

from ocljax.sweep.devices import (
    devices_for,
    enable_compilation_cache,
    request_cpu_devices,
    request_deterministic,
)
from ocljax.sweep.members import Member, expand, parse_assignment, parse_value

__all__ = [
    "Member", "devices_for", "enable_compilation_cache", "expand", "parse_assignment",
    "parse_value", "request_cpu_devices", "request_deterministic",
]
