"""Checkpoints of a running sweep with orbax, for exact resume after preemption or a kill.

What a checkpoint holds (saved at chunk boundaries, see ``ocljax.run.driver.run``): the carried
state of every member (learner state, blind-baseline state, divergence record), the online
counters, every evaluation and block loss so far, and ``meta`` (the next block to run, blocks
per chunk, run time so far, a fingerprint of the run's settings). The stream is rebuilt from
its seeds and the keys are ``fold_in(member_key, t)``, so nothing else is needed: a resumed run
produces bit-identical numbers to an uninterrupted one on the same backend.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a kill
mid-save leaves the previous checkpoint intact. The last ``keep`` are kept; when the newest one
cannot be read (corrupt or truncated), the previous one is used, with a warning.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax

from ocljax.errors import ConfigError, Interrupted

__all__ = ["Checkpointer", "Interrupted"]


def _quiet_orbax():
    """Import orbax with its INFO chatter (one line per save) silenced."""
    import orbax.checkpoint as ocp

    for name in ("absl", "orbax", "orbax.checkpoint"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return ocp


class Checkpointer:
    """Save and restore one sweep's progress under ``directory`` (one orbax step per save).

    ``every_s``: minimum seconds between periodic saves (``due``); ``keep``: checkpoints kept.
    """

    def __init__(self, directory: str | Path, every_s: float = 60.0, keep: int = 3,
                 log: Callable[[str], None] | None = None):
        if keep < 1:
            raise ConfigError(f"checkpoints to keep must be >= 1, got {keep}")
        self.directory = Path(directory).resolve()
        self.every_s, self.keep = every_s, keep
        self.log = log or (lambda msg: None)
        self.last = time.monotonic()
        self._manager = None

    @property
    def manager(self):
        if self._manager is None:
            ocp = _quiet_orbax()
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                                   enable_async_checkpointing=False)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def exists(self) -> bool:
        """True when at least one checkpoint is on disk."""
        return self.directory.is_dir() and bool(self.manager.all_steps())

    def due(self) -> bool:
        """True when ``every_s`` seconds have passed since the last save (or the start)."""
        return time.monotonic() - self.last >= self.every_s

    def save(self, step: int, tree, meta: dict) -> None:
        """Write checkpoint ``step`` (a pytree of arrays and a JSON-able ``meta``); blocks until
        it is complete on disk."""
        ocp = _quiet_orbax()
        if step in self.manager.all_steps():
            # only a step that ``restore`` skipped as unreadable is on disk again: a resumed
            # run saves the same step with the same numbers
            self.log(f"checkpoint: replacing block {step} in {self.directory}")
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        self.last = time.monotonic()
        self.log(f"checkpoint: block {step} saved in {self.directory}")

    def restore(self, abstract: Callable[[dict], object]) -> tuple[object, dict] | None:
        """The newest readable checkpoint as ``(tree, meta)``, or None when there is none.

        ``abstract(meta)`` returns the ``jax.ShapeDtypeStruct`` tree (with shardings) to
        restore into; it may depend on the meta (e.g. how many evaluations were saved). A
        checkpoint that fails to read is skipped with a warning and the previous one tried.
        """
        if not self.directory.is_dir():
            return None
        ocp = _quiet_orbax()
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore())).meta
                target = abstract(meta)
                tree = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target))).state
                jax.block_until_ready(tree)
            except ConfigError:  # a readable checkpoint of another run: never silently restart
                raise
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: fall back
                message = (f"checkpoint {step} in {self.directory} cannot be read "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                           "trying the previous one")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                self.log(message)
                continue
            self.log(f"checkpoint: resuming from block {step} in {self.directory}")
            return tree, meta
        return None

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None
