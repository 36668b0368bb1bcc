"""Blind classifier: predicts from recent labels only, never looking at the input.

Hammoud et al. 2023 ("Rapid Adaptation in Online Continual Learning: Are We Evaluating It
Right?", ICCV 2023, Sec. 3) show that a classifier that ignores its input can reach a high
*online* (test-then-train) accuracy by exploiting label correlation in the stream: in a
class-incremental stream the next label is very likely one of the last few. This learner is
that baseline: it predicts the most frequent label among the last ``window`` labels of the
stream (ties to the lowest class id; before any label, class 0). Run it on any stream
(``--learner blind``) to see how much of an online-accuracy figure the stream's label order
gives away; the driver also tracks it beside every run (``blind_online_accuracy``,
``blind_near_future_accuracy``), through the same functions.

Its logits are the log of the Laplace-smoothed label frequencies in the window, so its
training loss is the cross-entropy of that frequency model on the incoming labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax.numpy as jnp

from ocljax.errors import ConfigError
from ocljax.losses import cross_entropy
from ocljax.types import Array, Batch, Learner, Model, identity_prepare_eval


@dataclass(frozen=True)
class Config:
    window: int = 50  # labels remembered (the k of "most frequent of the last k labels")


class HParams(NamedTuple):
    """No traced hyperparameters: the blind classifier does not learn by gradient."""


class State(NamedTuple):
    labels: Array  # [window] int32, the last labels seen, -1 where empty
    pos: Array  # [] int32, next slot to write


def check_config(cfg: Config) -> None:
    """``ConfigError`` for a window that cannot hold a label."""
    if cfg.window < 1:
        raise ConfigError(f"blind window must be >= 1, got {cfg.window}")


def init_state(window: int) -> State:
    """An empty label window."""
    if window < 1:
        raise ConfigError(f"blind window must be >= 1, got {window}")
    return State(jnp.full((window,), -1, jnp.int32), jnp.zeros((), jnp.int32))


def observe(state: State, y: Array, keep: Array | bool = True) -> State:
    """Append labels ``y [B]`` to the window (oldest overwritten first) when ``keep``."""
    window = state.labels.shape[0]
    slots = (state.pos + jnp.arange(y.shape[0])) % window
    # Only the last ``window`` labels of a long batch survive; earlier ones would be overwritten.
    live = jnp.arange(y.shape[0]) >= y.shape[0] - window
    written = state.labels.at[jnp.where(live & keep, slots, window)].set(y, mode="drop")
    pos = jnp.where(keep, (state.pos + y.shape[0]) % window, state.pos)
    return State(written, pos.astype(jnp.int32))


def label_logits(state: State, num_classes: int) -> Array:
    """Log of the Laplace-smoothed label frequencies in the window: [C]."""
    seen = state.labels >= 0
    counts = jnp.zeros((num_classes,), jnp.float32).at[jnp.clip(state.labels, 0)].add(
        seen.astype(jnp.float32))
    return jnp.log((counts + 1.0) / (seen.sum() + num_classes))


def predict_labels(state: State, num_classes: int, n: int) -> Array:
    """The blind prediction for ``n`` inputs: the window's most frequent label, [n] int32."""
    return jnp.full((n,), jnp.argmax(label_logits(state, num_classes)), jnp.int32)


def make(model: Model, cfg: Config | None = None) -> Learner:
    """The blind learner for ``model``'s number of classes (the network itself is unused)."""
    cfg = cfg or Config()
    C = model.num_classes

    def init(key, x, hp: HParams) -> State:
        del key, x, hp
        return init_state(cfg.window)

    def predict(state: State, x, hp: HParams):
        del hp
        return jnp.broadcast_to(label_logits(state, C), (x.shape[0], C))

    def update(state: State, batch: Batch, hp: HParams, key):
        del key
        logits = predict(state, batch.x, hp)
        loss = cross_entropy(logits, batch.y, None)
        return observe(state, batch.y, batch.fresh), {"loss": loss, "stream_logits": logits}

    return Learner(init, update, predict, identity_prepare_eval, HParams())
