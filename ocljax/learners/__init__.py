"""Learner registry: name -> module with ``Config``, ``HParams`` and ``make(model, cfg)``.

Modules are imported on first use, so ``python -m experiments.NAME --help`` stays fast and one
learner's import cost is paid only by runs that use it. Every registered learner is covered by
the contract suite in ``tests/test_learner_contract.py``.

A module may set ``REQUIRES_BOUNDARIES = True`` when it cannot run without the stream's task
boundaries (``Batch.boundary``); ``check_stream`` then refuses it on a ``--task-free`` stream
with a message that names the method's task-free alternative.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType

from ocljax.errors import ConfigError

# name -> (module under ocljax.learners, one-line description)
LEARNERS: dict[str, tuple[str, str]] = {
    "finetune": ("finetune", "plain SGD on the stream, no memory (lower bound)"),
    "er": ("er", "experience replay from a reservoir buffer"),
    "er_ncm": ("er_ncm", "ER with a nearest-class-mean classifier"),
}


class _Registry(Mapping):
    """Read-only ``name -> module`` mapping that imports a module the first time it is read.

    Modules that serve several names (``der`` serves ``der`` and ``derpp``) expose
    ``for_name(name)`` returning the module-like namespace for that name.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(LEARNERS)

    def __len__(self) -> int:
        return len(LEARNERS)

    def __getitem__(self, name: str) -> ModuleType:
        module = importlib.import_module(f"ocljax.learners.{LEARNERS[name][0]}")
        return module.for_name(name) if hasattr(module, "for_name") else module


REGISTRY: Mapping[str, ModuleType] = _Registry()


def get(name: str) -> ModuleType:
    """The learner module registered as ``name``; ``ConfigError`` listing choices otherwise."""
    if name not in LEARNERS:
        raise ConfigError(
            f"unknown learner {name!r}; choose one of {', '.join(sorted(LEARNERS))}"
        )
    return REGISTRY[name]


def config_fields(name: str) -> dict[str, object]:
    """Static settings of a learner and their defaults."""
    return {f.name: f.default for f in dataclasses.fields(get(name).Config)}


def hparam_fields(name: str) -> dict[str, float]:
    """Traced hyperparameters of a learner and their defaults."""
    return dict(get(name).HParams()._asdict())


def check_stream(name: str, task_free: bool) -> None:
    """Refuse a learner that needs task boundaries on a task-free stream."""
    module = get(name)
    if task_free and getattr(module, "REQUIRES_BOUNDARIES", False):
        hint = getattr(module, "TASK_FREE_HINT", "")
        raise ConfigError(
            f"{name} needs task boundaries, but the stream is task-free (--task-free hides "
            f"them); run it with --no-task-free" + (f", or {hint}" if hint else "")
        )


__all__ = ["LEARNERS", "REGISTRY", "check_stream", "config_fields", "get", "hparam_fields"]
