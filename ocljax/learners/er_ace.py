"""ER-ACE: experience replay with an asymmetric cross-entropy.

Caccia et al. 2022, "New Insights on Reducing Abrupt Representation Change in Online Continual
Learning" (ICLR 2022), Sec. 4 (ER-ACE). ER's single cross-entropy over incoming and replayed
rows pulls the representations of old classes towards the poorly embedded samples of a new
class, most violently at a task switch. ER-ACE splits the loss in two:

    L = CE(f(x_in), y_in; logits restricted to C_in) + CE(f(x_buf), y_buf; all classes)

where ``C_in`` is the set of classes *present in the incoming mini-batch*: the incoming rows
only compete among their own classes, so they never push down the logits of the (absent) old
classes, while the replayed rows see every class and keep learning to tell old from new. Both
terms are means over their own rows, summed, as in the authors' code (``pclucas14/AML``,
``methods/er_ace.py``: ``process_inc + process_re``). ``C_in`` is read from the labels of each
incoming batch, so the method is task-free; the authors run it task-free and mask from the very
first step, and so does this module.

Restricting the logits is done by replacing the excluded ones with -1e9 (as the authors do)
through ``jnp.where``, so their gradient is exactly zero.

Deviations and options:

- ``unmask_unseen`` (default False, the paper's rule): the authors' code also leaves unmasked
  every class index from the largest label seen so far upwards (``mask[:, seen.max():] = 1``),
  i.e. the not-yet-seen classes when labels arrive in increasing order. With
  ``unmask_unseen=True`` this module leaves unmasked the classes that no incoming batch has
  contained so far (tracked in ``State.seen``), which is that rule without the assumption on
  label order (it does not unmask the largest seen label itself).
- The classifier head is the model's plain linear layer, as for every other learner here, so
  that ER-ACE differs from ER only in its loss. The authors' code (``pclucas14/AML``,
  ``main.py``: ``distLinear``, a cosine-similarity head with scale 10) and Mammoth's default
  (``use_custom_classifier``) train ER-ACE with a cosine head: published ER-ACE numbers include
  its effect.
- As in ``ocljax.learners.er``, incoming and replayed rows go through one forward pass (the
  authors use two); identical for models without BatchNorm.
- Buffer, deferred write and replay draw are ER's (``ocljax.learners.er``): reservoir memory,
  ``replay_batch`` rows drawn without replacement from batches before the current one; rows
  missing while the buffer fills are masked out of the replay term.

Recommended settings for split MNIST (batch 10, MLP 784-256-256-10): ``buffer_size`` 1000,
``replay_batch`` 10, SGD ``lr`` 0.1 (the defaults, those of ``er``). The method adds no
coefficient to tune; the paper (CIFAR / Mini-ImageNet streams) replays as many rows as arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax.learners import er
from ocljax.learners.supervised import NetState, gradient_step, net_learner, online_logits
from ocljax.losses import cross_entropy
from ocljax.memory import reservoir
from ocljax.types import Array, Batch, Learner, Model

MASKED_LOGIT = -1e9  # the authors' fill value: exp(-1e9 - max) is exactly 0 in float32


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_batch: int = 10
    optimizer: str = "sgd"
    unmask_unseen: bool = False  # also leave never-seen classes unmasked (authors' code)


class HParams(NamedTuple):
    lr: float = 0.1


class State(NamedTuple):
    net: NetState
    buffer: reservoir.ReservoirState  # data = {"x": [cap, ...], "y": [cap]}
    pending: dict  # {"x": [B, ...], "y": [B]}: last incoming batch, not yet written
    pending_valid: Array  # [B] bool
    seen: Array  # [C] bool, classes contained in some incoming batch so far


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes or an unknown optimizer."""
    er.check_config(cfg)


def present_classes(labels: Array, num_classes: int) -> Array:
    """[C] bool: the classes that occur in ``labels`` [N]."""
    return jnp.zeros((num_classes,), bool).at[labels].set(True)


def incoming_loss(logits: Array, labels: Array, allowed: Array) -> Array:
    """Cross-entropy of ``logits`` [N, C] restricted to the classes where ``allowed`` [C].

    The excluded logits are replaced by a constant, so their gradient is exactly zero.
    """
    return cross_entropy(jnp.where(allowed[None, :], logits, MASKED_LOGIT), labels)


def ace_loss(stream_logits, stream_y, replay_logits, replay_y, replay_mask, allowed):
    """ER-ACE objective: masked CE on the incoming rows + plain CE on the valid replay rows.

    Returns ``(loss, (incoming term, replay term))``; the replay term is 0 without valid rows.
    """
    inc = incoming_loss(stream_logits, stream_y, allowed)
    rep = cross_entropy(replay_logits, replay_y, replay_mask)
    return inc + rep, (inc, rep)


def update_state(model: Model, cfg: Config, state: State, batch: Batch, hp, key):
    """One ER-ACE step: write the pending batch, replay, step on the asymmetric loss."""
    k_write, k_read = jax.random.split(key)
    inner = er.flush(state, k_write, batch.fresh)
    stream = {"x": batch.x, "y": batch.y}
    replay, replay_mask = er.replay_rows(inner.buffer, k_read, cfg.replay_batch, stream)
    present = present_classes(batch.y, model.num_classes)
    seen = state.seen | present
    allowed = present | ~seen if cfg.unmask_unseen else present
    n_stream = batch.y.shape[0]
    x = jnp.concatenate([batch.x, replay["x"]])

    def loss_fn(params, model_state):
        logits, _, model_state = model.apply(params, model_state, x, True)
        loss, _ = ace_loss(logits[:n_stream], batch.y, logits[n_stream:], replay["y"],
                           replay_mask, allowed)
        return loss, (logits, model_state)

    net, loss, logits = gradient_step(cfg.optimizer, inner.net, loss_fn, hp.lr)
    new = er.hold(inner._replace(net=net, seen=seen), stream, batch.fresh)
    return new, {"loss": loss, "stream_logits": online_logits(net, logits[:n_stream])}


def make(model: Model, cfg: Config | None = None) -> Learner:
    """ER-ACE learner for ``model`` with a reservoir buffer of ``cfg.buffer_size`` rows."""
    cfg = cfg or Config()
    check_config(cfg)

    def init(key, x, hp: HParams) -> State:
        base = er.init_state(model, cfg, key, x, hp)
        return State(*base, seen=jnp.zeros((model.num_classes,), bool))

    return net_learner(model, init, partial(update_state, model, cfg), HParams())
