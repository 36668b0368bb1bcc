"""Core protocols: what a learner sees, what it is, and what a model is.

A learner is written for *one* run and one example stream; the driver batches it across the
member axis (seeds x hyperparameter grid) with a single ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Array = jax.Array
PyTree = Any


class Batch(NamedTuple):
    """What a learner sees at one step of the stream, for one member.

    ``task`` and ``boundary`` are the values the stream *reveals*: under ``--task-free`` they are
    always ``0`` and ``False`` so a learner cannot cheat by reading them. When the stream
    repeats each incoming batch k times (``passes``), ``fresh`` marks the first pass: memories
    should store a batch only then.
    """

    x: Array  # [B, H, W, C] in the pool's dtype (uint8 images); the model normalises
    y: Array  # [B] int32 labels
    task: Array  # [] int32, shared by all members
    boundary: Array  # [] bool, True on the first step of a new task (shared)
    t: Array  # [] int32, global step index (shared)
    fresh: Array  # [] bool, first pass over this incoming batch (False on its repeats)


class Learner(NamedTuple):
    """A continual learner as four pure functions over an explicit state pytree.

    init(key, x_example [B, ...], hp) -> state
    update(state, batch: Batch, hp, key) -> (state, metrics)
        ``metrics`` is a dict of scalars holding at least ``"loss"``; it may hold
        ``"stream_logits"`` [B, C], the pre-update logits on the incoming batch, which the driver
        then uses for online (test-then-train) accuracy instead of a second forward pass; they
        must be what ``predict`` of the pre-update state gives, so learners return None on a
        BatchNorm model, whose training forward normalises rows with the batch's statistics
        (``ocljax.learners.supervised.online_logits``), and the driver calls ``predict``.
    predict(state, x [N, ...], hp) -> logits [N, C]
    prepare_eval(state, hp, key) -> state used by ``predict`` at evaluation time
        (identity for most learners; class means for nearest-class-mean learners, ...).
    default_hparams: the traced hyperparameters (a NamedTuple of floats), swept with ``vmap``.
    features(state, x [N, ...], hp) -> [N, F] (optional, ``None`` when the learner has none)
        the representation a linear probe reads (``ocljax.metrics.probe``): the model's
        penultimate features in evaluation mode. Call it on a state returned by
        ``prepare_eval`` (GDumb's network is only trained there).
    """

    init: Callable[..., PyTree]
    update: Callable[..., tuple[PyTree, dict[str, Array]]]
    predict: Callable[..., Array]
    prepare_eval: Callable[..., PyTree]
    default_hparams: Any
    features: Callable[..., Array] | None = None


class Model(NamedTuple):
    """A network as two pure functions; learners never import flax.

    init(key, x [B, ...]) -> (params, model_state)
        ``model_state`` holds non-trained variables (BatchNorm statistics); ``{}`` when none.
    apply(params, model_state, x [B, ...], train: bool) -> (logits [B, C], features [B, F],
        new_model_state)
    """

    init: Callable[..., tuple[PyTree, PyTree]]
    apply: Callable[..., tuple[Array, Array, PyTree]]
    num_classes: int
    feature_dim: int


def identity_prepare_eval(state: PyTree, hp: Any, key: Array) -> PyTree:
    """The default ``prepare_eval``: evaluate with the training state itself."""
    del hp, key
    return state
