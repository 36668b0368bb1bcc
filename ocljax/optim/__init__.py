"""Optimizers built from traced hyperparameters, so one compiled program sweeps them."""

from __future__ import annotations

import optax

from ocljax.errors import ConfigError, unknown_choice

OPTIMIZERS = ("sgd", "adam", "sgd_optax")


def build(name: str, lr) -> optax.GradientTransformation:
    """The optimizer ``name`` with learning rate ``lr`` (a traced scalar is fine).

    ``sgd`` and ``sgd_optax`` are the same rule, ``w - lr * grad``; learners built on
    ``ocljax.learners.supervised`` apply ``sgd`` with the learning rate folded into the loss
    (see ``cross_entropy_step``: it lets XLA fuse the update into the gradient matmul) and
    ``sgd_optax`` through this optax transformation, the reference the fused path is tested
    and benchmarked against.

    Build it inside traced code from the member's hyperparameters, never store it in a
    static config: the optimizer *state* of sgd and adam does not depend on ``lr``.
    """
    if name in ("sgd", "sgd_optax"):
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr)
    raise ConfigError(unknown_choice("optimizer", name, OPTIMIZERS))


def check(name: str) -> str:
    """Validate an optimizer name at configuration time; returns it."""
    if name not in OPTIMIZERS:
        raise ConfigError(unknown_choice("optimizer", name, OPTIMIZERS))
    return name
