"""Spreading members over local devices.

On CPU, XLA runs one device's work on few threads, so small per-step matmuls leave cores idle;
splitting the members over several *virtual* CPU devices runs them on parallel threads
(measured on a 2-core machine: 8 seeds over 8 virtual devices ran 3.4x faster than the same 8
seeds vmapped on one device). The CLI therefore asks XLA for virtual CPU devices before JAX
starts; on GPU/TPU the flag only affects the (unused) host platform.
"""

from __future__ import annotations

import os

FLAG = "--xla_force_host_platform_device_count"


def request_cpu_devices(n: int) -> bool:
    """Ask for ``n`` virtual CPU devices; must run before JAX initialises its backends.

    Leaves an explicit user setting in ``XLA_FLAGS`` alone. Returns True when the flag was set.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags or n <= 1:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={int(n)}".strip()
    return True


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def request_deterministic() -> bool:
    """Ask XLA for deterministic GPU kernels (no atomics in scatter-adds and reductions, a
    fixed convolution algorithm): identical bits run to run on one GPU, at some speed cost.
    CPU and TPU runs are deterministic without it. Must run before JAX initialises its
    backends; returns True when the flag was added (see ``docs/robustness.md``)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()
    return True


def devices_for(n_members: int, n_available: int) -> int:
    """How many devices to spread ``n_members`` over: as few rounds of members per device as
    ``n_available`` allows, with the least padding (e.g. 5 members on 8 devices -> 5)."""
    per_device = -(-n_members // max(n_available, 1))
    return max(1, min(n_available, -(-n_members // per_device)))


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Keep compiled programs on disk so a rerun of the same experiment skips compilation.

    ``path`` defaults to ``$OCLJAX_CACHE_DIR`` or ``~/.cache/ocljax/jax``; ``OCLJAX_CACHE_DIR=``
    (empty) turns the cache off. Returns the directory used, or None.

    Every program is kept, however quickly it compiled (JAX's default keeps only those that
    took a second or more): a run compiles its chunk, initialisation and probe in 0.1-0.7 s
    each on a CPU, and all of them together are most of a small experiment's start-up.
    """
    import jax

    path = path if path is not None else os.environ.get(
        "OCLJAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ocljax", "jax")
    )
    if not path:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
