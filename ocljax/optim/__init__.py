"""Optimizers built from traced hyperparameters, so one compiled program sweeps them."""

from __future__ import annotations

import optax

from ocljax.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")


def build(name: str, lr) -> optax.GradientTransformation:
    """The optimizer ``name`` with learning rate ``lr`` (a traced scalar is fine).

    Build it inside traced code from the member's hyperparameters, never store it in a
    static config: the optimizer *state* of sgd and adam does not depend on ``lr``.
    """
    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def check(name: str) -> str:
    """Validate an optimizer name at configuration time; returns it."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return name
