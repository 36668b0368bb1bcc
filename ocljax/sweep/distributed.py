"""Multi-host sweeps on JAX's own multi-controller runtime (no scheduler of our own).

Every process runs the same command: it builds the same member list and stream, and the driver
shards the member axis over *all* devices of all processes (a 1-D mesh; ``shard_map`` under
``jit``). Each process feeds the shards of the members its devices hold from its own host copy
of the inputs, and results are all-gathered (they are small: accuracies, counters, losses).
Process 0 writes the shared summary; every process writes the evaluation rows of the members
it owns (``eval.p{k}.jsonl``).

``initialize()`` calls ``jax.distributed.initialize`` when asked to:
* ``OCLJAX_DISTRIBUTED=1`` (or the CLI's ``--distributed``), or automatically on a worker of a
  multi-host Cloud TPU slice: there (and on SLURM) JAX detects the coordinator, process count
  and id itself;
* elsewhere (e.g. several processes on one machine, talking over loopback) also set
  ``OCLJAX_COORDINATOR=host:port``, ``OCLJAX_NUM_PROCESSES`` and ``OCLJAX_PROCESS_ID``.
It must run before JAX touches a backend.
"""

from __future__ import annotations

import os

import numpy as np

from ocljax.errors import ConfigError

_initialized = False


def requested() -> bool:
    """True when the environment asks for a multi-process run: ``OCLJAX_DISTRIBUTED=1``, or a
    Cloud TPU VM that is one worker of several (``TPU_WORKER_HOSTNAMES`` lists more than one
    host; ``OCLJAX_DISTRIBUTED=0`` turns this off)."""
    flag = os.environ.get("OCLJAX_DISTRIBUTED", "")
    if flag in ("0", "false", "False"):
        return False
    if flag:
        return True
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(force: bool = False) -> bool:
    """Join the multi-process runtime if ``force`` or ``requested()``; returns whether it did."""
    global _initialized
    if _initialized:
        return True
    if not (force or requested()):
        return False
    import jax

    kwargs = {}
    if os.environ.get("OCLJAX_COORDINATOR"):
        try:
            kwargs = {"coordinator_address": os.environ["OCLJAX_COORDINATOR"],
                      "num_processes": int(os.environ["OCLJAX_NUM_PROCESSES"]),
                      "process_id": int(os.environ["OCLJAX_PROCESS_ID"])}
        except (KeyError, ValueError) as err:
            raise ConfigError("OCLJAX_COORDINATOR needs OCLJAX_NUM_PROCESSES and "
                              f"OCLJAX_PROCESS_ID (integers) as well: {err}") from None
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # noqa: BLE001 - report what failed, in one line
        raise ConfigError(f"jax.distributed.initialize failed: {err}") from None
    _initialized = True
    return True


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) array as a full host numpy array on every process."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def owned_members(n_padded: int) -> range:
    """The members (of ``n_padded``, laid out evenly over all devices in process order) whose
    shards live on this process's devices."""
    import jax

    per_process = n_padded // jax.process_count()
    start = jax.process_index() * per_process
    return range(start, start + per_process)


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag True on every process if it is True on any (one process's SIGTERM or timer
    must stop / checkpoint all of them at the same chunk, or their collectives would hang)."""
    import jax

    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    from jax.experimental import multihost_utils

    every = multihost_utils.process_allgather(np.array(flags, np.int32))
    return tuple(bool(v) for v in np.asarray(every).reshape(-1, len(flags)).any(0))


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
