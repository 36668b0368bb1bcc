"""Maximally Interfered Retrieval (ER-MIR).

Aljundi, Caccia, Belilovsky, Caccia, Lin, Charlin & Tuytelaars 2019, "Online Continual Learning
with Maximally Interfered Retrieval" (NeurIPS 2019), Sec. 3.1 and Algorithm 1 (ER-MIR). Each
step:

1. virtual update: ``theta_v = theta - lr * grad L(stream; theta)`` (one plain SGD step on the
   incoming batch only);
2. draw ``candidates`` rows (C) uniformly without replacement from the reservoir memory;
3. score each candidate by how much the virtual step would raise its loss,
   ``s(x) = L(x; theta_v) - L(x; theta)``;
4. replay the ``replay_batch`` highest-scoring candidates: one real optimizer step from
   ``theta`` on the incoming batch concatenated with them (exactly ER's update, ``er.py``).

The memory, its deferred write and the handling of a buffer smaller than C are ER's
(``er.flush``, ``er.replay_rows``): candidates that do not exist yet score ``-inf``, so the
replayed rows are the real candidates first, and any selected non-existent row is masked out of
the loss.

Settings. The paper and its code use C = 50 candidates and 10 replayed rows for MNIST and
CIFAR-10 (``--subsample 50``, ``Scripts/ER_experiments.sh`` of the authors' repository), SGD
with lr 0.1, batch 10; the defaults here are those with the surveys' 1000-row buffer:
``Config(buffer_size=1000, replay_batch=10, candidates=50)``, ``HParams(lr=0.1)``. Split MNIST,
2 seeds, CPU: final accuracy 0.914 (ER 0.915) at about 2.6x ER's step time; the paper's gains
over ER are largest with small memories (the authors' scripts use 20-100 rows per class).

Deviations. (a) The virtual step is plain SGD with ``hp.lr`` whatever the real optimizer is
(the paper's virtual update is SGD). (b) Candidate losses are computed in training mode
(BatchNorm normalises with the candidates' own statistics, as the reference code does with its
model in ``train()``); BatchNorm statistics from the virtual step and the scoring passes are
discarded, so only the real step changes the state. (c) The authors' code has two extras that
are not part of Algorithm 1 and are left out: excluding the current task from the candidates
(it needs task labels) and, on MNIST, comparing with logits stored at write time
(``--compare_to_old_logits``); it also replays only from the second task on, where the memory
here is replayed from the first step on, like ER's. (d) The real step averages the loss over
the incoming and replayed rows together (``replay_loss = "joint"``, Algorithm 1's "SGD on
B_n u B_C"); the authors' code back-propagates the incoming mean and the replayed mean
separately (``Maximally_Interfered_Retrieval/mir.py``), which is ``replay_loss = "sum"`` and,
with 10 + 10 rows and plain SGD, the same as ``joint`` at twice the learning rate (``er.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ocljax.errors import ConfigError
from ocljax.learners import er
from ocljax.learners.supervised import NetState, net_learner, online_logits
from ocljax.losses import cross_entropy
from ocljax.types import Array, Batch, Learner, Model

__all__ = ["Config", "HParams", "State", "check_config", "interference_scores", "make",
           "retrieve", "update_state"]


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_batch: int = 10  # rows replayed per step (top-k of the candidates)
    candidates: int = 50  # C, rows drawn from memory and scored each step
    optimizer: str = "sgd"
    replay_loss: str = "joint"  # "joint" | "sum": see er.py ("sum" is the authors' code's)


class HParams(NamedTuple):
    lr: float = 0.1


State = er.State


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes."""
    er.check_config(cfg)
    if cfg.candidates < cfg.replay_batch:
        raise ConfigError(
            f"candidates={cfg.candidates} must be >= replay_batch={cfg.replay_batch}: MIR "
            "replays the replay_batch most interfered rows among the candidates"
        )
    if cfg.candidates > cfg.buffer_size:
        raise ConfigError(
            f"candidates={cfg.candidates} rows cannot be drawn without replacement from a "
            f"buffer of {cfg.buffer_size}"
        )


def virtual_params(model: Model, net: NetState, x: Array, y: Array, lr):
    """``theta - lr * grad`` of the mean cross-entropy on ``(x, y)`` (a plain SGD step)."""

    def loss(params):
        logits, _, _ = model.apply(params, net.model_state, x, True)
        return cross_entropy(logits, y)

    grads = jax.grad(loss)(net.params)
    return jax.tree.map(lambda p, g: p - lr * g, net.params, grads)


def interference_scores(model: Model, net: NetState, virtual, x: Array, y: Array) -> Array:
    """Per-row loss increase ``L(x; virtual) - L(x; theta)`` [N] (training-mode forward passes,
    BatchNorm updates discarded)."""

    def per_row(params):
        logits, _, _ = model.apply(params, net.model_state, x, True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return per_row(virtual) - per_row(net.params)


def retrieve(model: Model, cfg: Config, net: NetState, buffer, stream: dict, key, lr):
    """The ``replay_batch`` most interfered of ``candidates`` rows drawn from ``buffer``.

    Returns ``(rows, mask [k] bool, candidates, candidate_mask [C] bool, scores [C])``;
    non-existent candidates (buffer smaller than C) score ``-inf``.
    """
    cands, cand_mask = er.replay_rows(buffer, key, cfg.candidates, stream)
    virtual = virtual_params(model, net, stream["x"], stream["y"], lr)
    scores = interference_scores(model, net, virtual, cands["x"], cands["y"])
    scores = jax.lax.stop_gradient(jnp.where(cand_mask, scores, -jnp.inf))
    _, top = jax.lax.top_k(scores, cfg.replay_batch)
    rows = jax.tree.map(lambda a: a[top], cands)
    return rows, cand_mask[top], cands, cand_mask, scores


def update_state(model: Model, cfg: Config, state: State, batch: Batch, hp, key):
    """One ER-MIR step: write the pending batch, retrieve, train on stream + retrieved rows."""
    k_write, k_read = jax.random.split(key)
    state = er.flush(state, k_write, batch.fresh)
    stream = {"x": batch.x, "y": batch.y}
    replay, replay_mask, *_ = retrieve(model, cfg, state.net, state.buffer, stream, k_read,
                                       hp.lr)
    net, loss, logits = er.replay_step(model, cfg, state.net, stream, replay, replay_mask, hp.lr)
    state = er.hold(state._replace(net=net), stream, batch.fresh)
    return state, {"loss": loss,
                   "stream_logits": online_logits(net, logits[:batch.y.shape[0]])}


def make(model: Model, cfg: Config | None = None) -> Learner:
    """ER-MIR learner for ``model``: reservoir memory, replay of the most interfered rows."""
    cfg = cfg or Config()
    check_config(cfg)
    return net_learner(model, partial(er.init_state, model, cfg),
                       partial(update_state, model, cfg), HParams())
