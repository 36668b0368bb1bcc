"""Learner registry: name -> module with ``Config``, ``HParams`` and ``make(model, cfg)``.

Every registered learner is covered by the contract suite in ``tests/test_learner_contract.py``.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from ocljax.errors import ConfigError
from ocljax.learners import er, er_ncm, finetune

REGISTRY: dict[str, ModuleType] = {
    "finetune": finetune,
    "er": er,
    "er_ncm": er_ncm,
}


def get(name: str) -> ModuleType:
    """The learner module registered as ``name``; ``ConfigError`` listing choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown learner {name!r}; choose one of {', '.join(sorted(REGISTRY))}"
        ) from None


def config_fields(name: str) -> dict[str, object]:
    """Static settings of a learner and their defaults."""
    return {f.name: f.default for f in dataclasses.fields(get(name).Config)}


def hparam_fields(name: str) -> dict[str, float]:
    """Traced hyperparameters of a learner and their defaults."""
    return dict(get(name).HParams()._asdict())


__all__ = ["REGISTRY", "config_fields", "get", "hparam_fields"]
