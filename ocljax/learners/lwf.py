"""Learning without Forgetting (LwF), adapted to online class-incremental streams.

Li & Hoiem 2016, "Learning without Forgetting" (ECCV 2016; TPAMI 2017), Sec. 3, Eq. 2-4:
the network is trained on the new data with its usual loss plus ``lambda_o`` times a
knowledge-distillation loss that keeps its outputs close to those the *original* network
(frozen before the new task) gives on the same new inputs:

    L_old = -mean_b sum_c  q_bc log p_bc,    q = softmax(z_old / T),  p = softmax(z / T)

(Eq. 2-3, the paper's modified cross-entropy with T = 2). The total loss here is

    loss = CE(z, y) + lam * L_old,

on the incoming batch only (LwF keeps no memory).

Class-incremental adaptation, as in Avalanche's ``LwFPlugin`` / ``LearningWithoutForgetting``
and the LwF baseline of Mai et al. 2022 ("Online continual learning in image classification:
an empirical survey"): one shared head instead of the paper's per-task heads, the "original
network" is a snapshot of the whole model taken at each task boundary (the state right before
the first update of the new task), and the distillation runs over the classes the snapshot had
seen (Avalanche's "active units"): unseen output units are masked out of both softmaxes.
Before the first snapshot that has seen a class, the distillation term is off.

Deviations from the paper, and why:

* Single head, class-incremental, snapshot refreshed at every boundary (above); the paper's
  warm-up step (training only the new head first) and its weight decay ``R`` have no
  counterpart here: no head is added, and weight decay is a matter of the optimizer.
* The snapshot's outputs are computed on the fly on each incoming batch rather than recorded
  once before training: the snapshot is frozen, so this is the same quantity.
* ``L_old`` is the paper's cross-entropy form. It differs from Avalanche's KL divergence by the
  snapshot's entropy, a constant of the parameters, so the gradients are the same; it is *not*
  multiplied by T^2 (Hinton et al.'s convention, used by the survey's code), as in the paper.
* The survey weights the terms convexly, ``CE / (t+1) + KD * t / (t+1)`` after ``t`` tasks;
  here ``lam`` is a fixed traced coefficient (the paper's ``lambda_o``, default 1).
* With BatchNorm models the snapshot is evaluated in training mode (batch statistics, its
  statistics update discarded), so it normalises the batch exactly as the current network
  does and the two agree at the moment of the snapshot.

Task-free variant: ``Config.snapshot_every = N > 0`` ignores the stream's boundaries and
refreshes the snapshot every ``N`` updates (at update 0, N, 2N, ...), distilling over the
classes seen before each refresh. With ``snapshot_every = 0`` (default) the learner needs
task boundaries and is refused on ``--task-free`` streams.

Recommended settings (Split MNIST, MLP 784-256-256-10, batch 10, one pass): SGD lr 0.1,
``lam = 1``, ``T = 2`` (the paper's); ``--no-task-free``, or ``--set snapshot_every=1000``
(about one task's length at batch 10) on a task-free stream. Without replay LwF stays close to
finetune in class-incremental settings (the survey reports the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax import optim
from ocljax.errors import ConfigError
from ocljax.learners.supervised import (
    NetState,
    gradient_step,
    init_net,
    net_learner,
    online_logits,
)
from ocljax.losses import cross_entropy
from ocljax.types import Array, Batch, Learner, Model, PyTree

TASK_FREE_HINT = "refresh the snapshot on a schedule with --set snapshot_every=N (steps)"


@dataclass(frozen=True)
class Config:
    snapshot_every: int = 0  # 0: snapshot at task boundaries; N > 0: every N updates
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.1
    lam: float = 1.0  # weight of the distillation loss (the paper's lambda_o)
    temperature: float = 2.0  # distillation temperature T (the paper's T = 2)


class State(NamedTuple):
    net: NetState
    snapshot: PyTree  # parameters frozen at the last snapshot
    snapshot_seen: Array  # [C] bool, classes the snapshot had seen (distilled units)
    seen: Array  # [C] bool, classes seen so far
    step: Array  # [] int32, updates done


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible settings."""
    if cfg.snapshot_every < 0:
        raise ConfigError(
            f"snapshot_every must be >= 0 (0 = at task boundaries), got {cfg.snapshot_every}"
        )
    optim.check(cfg.optimizer)


def requires_boundaries(cfg: Config) -> bool:
    """Snapshots at task boundaries need them; a fixed schedule does not."""
    return cfg.snapshot_every == 0


def distillation_loss(logits: Array, target_logits: Array, mask: Array, temperature) -> Array:
    """The paper's L_old (Eq. 2-3) over the output units where ``mask`` [C] is True.

    ``-mean_b sum_{c in mask} softmax(t/T)_bc * log softmax(z/T)_bc`` with both softmaxes
    restricted to the masked units; logits [B, C] (``z``), target_logits [B, C] (``t``, no
    gradient flows into them). 0 when the mask is empty.
    """
    neg = jnp.asarray(-1e9, logits.dtype)
    z = jnp.where(mask[None], logits / temperature, neg)
    t = jnp.where(mask[None], jax.lax.stop_gradient(target_logits) / temperature, neg)
    log_p = jax.nn.log_softmax(z, axis=-1)
    q = jax.nn.softmax(t, axis=-1)
    per_row = -jnp.where(mask[None], q * log_p, 0.0).sum(-1)
    return jnp.where(mask.any(), per_row.mean(), 0.0)


def make(model: Model, cfg: Config | None = None) -> Learner:
    """LwF learner for ``model``: CE plus distillation towards the last snapshot."""
    cfg = cfg or Config()
    check_config(cfg)
    C = model.num_classes

    def init(key, x, hp: HParams) -> State:
        net = init_net(model, cfg.optimizer, key, x, hp.lr)
        return State(
            net=net,
            snapshot=net.params,
            snapshot_seen=jnp.zeros((C,), bool),
            seen=jnp.zeros((C,), bool),
            step=jnp.zeros((), jnp.int32),
        )

    def update(state: State, batch: Batch, hp: HParams, key):
        del key
        every = cfg.snapshot_every
        take = batch.boundary if every == 0 else state.step % every == 0
        pick = lambda new, old: jnp.where(take, new, old)  # noqa: E731
        snapshot = jax.tree.map(pick, state.net.params, state.snapshot)
        snapshot_seen = pick(state.seen, state.snapshot_seen)

        # the snapshot's outputs on the incoming batch (its BatchNorm update is discarded)
        target, _, _ = model.apply(snapshot, state.net.model_state, batch.x, True)

        def loss_fn(params, model_state):
            logits, _, model_state = model.apply(params, model_state, batch.x, True)
            ce = cross_entropy(logits, batch.y)
            kd = distillation_loss(logits, target, snapshot_seen, hp.temperature)
            return ce + hp.lam * kd, (logits, model_state)

        net, loss, logits = gradient_step(cfg.optimizer, state.net, loss_fn, hp.lr)
        seen = state.seen | (jax.nn.one_hot(batch.y, C) > 0).any(0)
        new = State(net, snapshot, snapshot_seen, seen, state.step + 1)
        return new, {"loss": loss, "stream_logits": online_logits(net, logits)}

    return net_learner(model, init, update, HParams())
