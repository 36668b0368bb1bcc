"""ER-AML: experience replay with an asymmetric metric-learning loss on the incoming rows.

Caccia et al. 2022, "New Insights on Reducing Abrupt Representation Change in Online Continual
Learning" (ICLR 2022), Sec. 4 (ER-AML, beside ER-ACE in ``er_ace``), checked against the
authors' code (``pclucas14/AML``: ``methods/er_aml.py``, ``buffer.py: sample_pos_neg``,
``methods/er.py``). Like ER-ACE it keeps the incoming rows of a new class from pulling old
classes' representations toward them, but through a metric loss instead of a masked softmax:

1. the incoming rows are embedded (the network's normalised penultimate features ``h``);
2. each incoming row i gets a *positive*, a row of its class drawn uniformly from the memory
   and the incoming batch (not itself), and a *negative*, a row of another class drawn the same
   way but only among the classes of the incoming batch (the task-free form of the code's
   ``same_task_neg``: old classes are never pushed away). Rows without both are left out;
3. the incoming loss is supervised-contrastive over that set (the code's ``sup_con_loss``): with
   anchors the incoming rows and the contrast set all sampled positives and negatives,

       l_i = -(tau / 0.07) mean_{p: y_p = y_i} log(exp(h_i.h_p / tau) / sum_c exp(h_i.h_c / tau))

   averaged over anchors (``aml_loss``; ``tau`` 0.2, the code's ``supcon_temperature``);
4. the replayed rows (``replay_batch`` drawn from a reservoir memory, as ER) get the plain
   cross-entropy over all classes, which alone trains the classifier; the two terms are added
   and one optimizer step is taken.

While the memory is empty the incoming rows get the plain cross-entropy (the code's "regular
training at the start" of its task-free mode). Prediction is the network's classifier.

Deviations from the authors' code:

- The classifier head is the model's plain linear layer, as for ER-ACE here (the code trains
  ER-AML with a cosine head, ``distLinear``); published ER-AML numbers include its effect.
- Incoming, positive, negative and replayed rows go through one forward pass (the code uses
  three); identical without BatchNorm.
- No augmentation (with ``use_augs`` the code applies its kornia augmentations, ``train_tf``,
  to the rows it embeds; off by default).
- This module runs the code's task-free mode (``--task_free 1``, the sweeps' setting) on every
  stream, with or without boundaries: negatives are drawn among the incoming batch's classes.
  In its default task-aware mode the code trains the first task with plain cross-entropy and
  no replay, starts the metric loss at the second task and picks negatives by task id.
- Positives and negatives come from the memory as it was before this step's write (written one
  step late, as in ``er``) plus the incoming batch; the code's pool is the same (it writes after
  the step).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax.learners import er
from ocljax.learners.er_ncm import unit_rows
from ocljax.learners.supervised import gradient_step, net_learner, online_logits
from ocljax.losses import cross_entropy
from ocljax.memory import reservoir
from ocljax.types import Array, Batch, Learner, Model

__all__ = ["BASE_TEMPERATURE", "Config", "HParams", "State", "aml_loss", "check_config", "make",
           "pool_rows", "positives_and_negatives"]

BASE_TEMPERATURE = 0.07  # the code's sup_con_loss scales the loss by tau / 0.07


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_batch: int = 10
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.1
    temperature: float = 0.2  # the code's supcon_temperature


State = er.State


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes or an unknown optimizer."""
    er.check_config(cfg)


def positives_and_negatives(key: Array, pool_y: Array, pool_valid: Array, n_incoming: int):
    """Indices into a pool whose last ``n_incoming`` rows are the incoming batch: for each
    incoming row, a positive (same label, not itself) and a negative (another label that occurs
    in the incoming batch), each uniform among the valid pool rows that qualify. Returns
    ``(pos [B], neg [B], ok [B])``; ``ok`` is False for rows lacking either."""
    m = pool_y.shape[0]
    inc = jnp.arange(m - n_incoming, m)
    y_inc = pool_y[inc]
    same = pool_y[:, None] == y_inc[None, :]  # [M, B]
    itself = jnp.arange(m)[:, None] == inc[None, :]
    in_batch = (pool_y[:, None] == y_inc[None, :]).any(axis=1)  # labels of the incoming batch
    pos_ok = same & ~itself & pool_valid[:, None]
    neg_ok = ~same & in_batch[:, None] & pool_valid[:, None]
    k_pos, k_neg = jax.random.split(key)
    pos = jnp.argmax(jnp.where(pos_ok, jax.random.uniform(k_pos, (m, n_incoming)), -1.0), 0)
    neg = jnp.argmax(jnp.where(neg_ok, jax.random.uniform(k_neg, (m, n_incoming)), -1.0), 0)
    return pos, neg, pos_ok.any(0) & neg_ok.any(0)


def pool_rows(memory_x: Array, incoming_x: Array, idx: Array) -> Array:
    """Rows ``idx`` of the pool (the memory's rows, then the incoming batch's), gathered from
    each part without concatenating the whole memory every step."""
    cap = memory_x.shape[0]
    inside = (idx < cap).reshape(-1, *([1] * (memory_x.ndim - 1)))
    return jnp.where(inside, memory_x[jnp.minimum(idx, cap - 1)],
                     incoming_x[jnp.maximum(idx - cap, 0)])


def aml_loss(h_anchor: Array, y_anchor: Array, h_contrast: Array, y_contrast: Array,
             anchor_ok: Array, contrast_ok: Array, temperature) -> Array:
    """The incoming loss (module docstring, step 3) over L2-normalised anchors [B, F] and
    contrast rows [K, F]; rows where ``*_ok`` is False take no part; 0 without anchors."""
    logits = h_anchor.astype(jnp.float32) @ h_contrast.astype(jnp.float32).T / temperature
    log_prob = logits - jax.nn.logsumexp(jnp.where(contrast_ok[None, :], logits, -1e9), axis=1,
                                         keepdims=True)
    positive = (y_anchor[:, None] == y_contrast[None, :]) & contrast_ok[None, :]
    mean_pos = jnp.where(positive, log_prob, 0.0).sum(1) / jnp.maximum(positive.sum(1), 1)
    per_anchor = -(temperature / BASE_TEMPERATURE) * mean_pos
    return jnp.where(anchor_ok, per_anchor, 0.0).sum() / jnp.maximum(anchor_ok.sum(), 1)


def update_state(model: Model, cfg: Config, state: State, batch: Batch, hp, key):
    """One ER-AML step: write the pending batch, draw replay rows, positives and negatives,
    step on the metric loss of the incoming rows plus the replayed rows' cross-entropy."""
    k_write, k_read, k_pair = jax.random.split(key, 3)
    state = er.flush(state, k_write, batch.fresh)
    stream = {"x": batch.x, "y": batch.y}
    replay, replay_mask = er.replay_rows(state.buffer, k_read, cfg.replay_batch, stream)
    b, cap = batch.y.shape[0], reservoir.capacity(state.buffer)
    pool_y = jnp.concatenate([state.buffer.data["y"], batch.y])
    pool_valid = jnp.concatenate([jnp.arange(cap) < reservoir.size(state.buffer),
                                  jnp.ones((b,), bool)])
    pos, neg, ok = positives_and_negatives(k_pair, pool_y, pool_valid, b)
    metric = reservoir.size(state.buffer) > 0  # the code: plain CE until the memory has rows
    pair_x = pool_rows(state.buffer.data["x"], batch.x, jnp.concatenate([pos, neg]))
    x = jnp.concatenate([batch.x, pair_x, replay["x"]])

    def loss_fn(params, model_state):
        logits, feats, model_state = model.apply(params, model_state, x, True)
        h = unit_rows(feats)
        contrast_ok = jnp.concatenate([ok, ok])
        aml = aml_loss(h[:b], batch.y, h[b:3 * b], jnp.concatenate([pool_y[pos], pool_y[neg]]),
                       ok, contrast_ok, hp.temperature)
        incoming = jnp.where(metric, aml, cross_entropy(logits[:b], batch.y))
        rep = cross_entropy(logits[3 * b:], replay["y"], replay_mask)
        return incoming + rep, (logits[:b], model_state)

    net, loss, logits = gradient_step(cfg.optimizer, state.net, loss_fn, hp.lr)
    state = er.hold(state._replace(net=net), stream, batch.fresh)
    return state, {"loss": loss, "stream_logits": online_logits(net, logits)}


def make(model: Model, cfg: Config | None = None) -> Learner:
    """ER-AML learner for ``model`` with a reservoir buffer of ``cfg.buffer_size`` rows."""
    cfg = cfg or Config()
    check_config(cfg)
    return net_learner(model, partial(er.init_state, model, cfg),
                       partial(update_state, model, cfg), HParams())
