"""CLS-ER: replay regularised by a plastic and a stable exponential moving average of the model.

Arani, Sarfraz & Zonooz 2022, "Learning Fast, Learning Slow: A General Continual Learning
Method based on Complementary Learning System" (ICLR 2022), Sec. 3 and Algorithm 1; authors'
code ``NeurAI-Lab/CLS-ER`` (``models/clser.py``, built on Mammoth). Three networks share one
architecture: the *working* model ``theta_W`` trained by SGD, and two semantic memories, a
*plastic* ``theta_P`` and a *stable* ``theta_S``, that follow it as exponential moving averages
of its weights. Each step, with the incoming batch ``(x, y)`` and ``replay_batch`` rows
``(x', y')`` drawn from a reservoir memory:

1. Each replayed row picks its target: the logits of the plastic or of the stable model,
   whichever gives the higher softmax probability to the row's label (``select_targets``; the
   code compares ``p_S > p_P`` strictly, so a tie goes to the plastic model). The whole logit
   vector of the chosen model is the target, not a per-class maximum.
2. The working model takes one SGD step on
   ``CE(f_W([x; x']), [y; y']) + reg_weight * MSE(f_W(x'), Z')``: one cross-entropy mean over
   the ``B + R`` rows and the squared logit difference averaged over replayed rows *and*
   classes (``nn.MSELoss``, then ``torch.mean``). The targets are constants.
3. The incoming batch enters the reservoir (deferred here to the next step, as in ER).
4. ``global_step`` advances, then each memory is updated with probability ``plastic_rate`` /
   ``stable_rate``, coins drawn independently every step:
   ``theta <- a theta + (1 - a) theta_W`` with ``a = min(1 - 1 / (global_step + 1), decay)``.
   The warm-up follows the step count, not the number of updates taken (``ema_update``).

Inference uses the stable model, as the paper's method describes (the authors' code evaluates
the working, plastic and stable models alike and logs each); ``predict`` and the linear probe
read it, and online accuracy scores it, as the model a deployed learner would answer with.
Both memories start as copies of the working model.

Defaults: the authors' Seq-MNIST settings for a buffer of 500 (``utils/best_args.py``, the
entry nearest this project's 1,000): ``reg_weight`` 2.0, plastic rate 1.0 and decay 0.99,
stable rate 0.9 and decay 0.99, SGD lr 0.1. Their replay minibatch there is 32 and their MLP
784-100-100-10; the default here keeps the project's 10 replayed rows and 784-256-256-10 (set
``replay_batch=32`` and ``width=100`` to match; README "CLS-ER against its code's numbers").

Deviations:

- One forward pass of the working model over ``[x; x']`` serves both terms; the code runs the
  replayed rows a second time alone for the consistency term. Identical without BatchNorm; with
  BatchNorm the batch statistics of that second pass would be those of the replayed rows only.
- The two memories run their forward in training mode, as in the code (they are never put in
  ``eval()`` inside ``observe``), so with BatchNorm their logits use the replayed rows' batch
  statistics and their running statistics are their own, updated by those forwards; only
  parameters are averaged. Evaluation uses the stable model's own running statistics.
- No augmentation: the code's MNIST datasets have none, but on CIFAR it augments the incoming
  and the replayed rows (crop and flip), and the memories' targets come from those views; runs
  of this port on image streams train on the raw images.
- While the memory holds fewer than ``replay_batch`` rows, the missing rows are copies of
  incoming rows (``er.with_filler``), masked out of both losses; with BatchNorm the memories'
  forward (and its running statistics) then sees them, for the first ``replay_batch / B``
  steps at most. The code's replay batch is shorter instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax.learners import er
from ocljax.learners.supervised import NetState, gradient_step, init_net
from ocljax.losses import cross_entropy, masked_mean
from ocljax.memory import reservoir
from ocljax.types import Array, Batch, Learner, Model, PyTree, identity_prepare_eval

__all__ = ["Config", "EMA", "HParams", "State", "check_config", "ema_decay", "ema_update",
           "make", "select_targets"]


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_batch: int = 10  # the code's minibatch_size (32 in its Seq-MNIST settings)
    optimizer: str = "sgd"


class HParams(NamedTuple):
    """Learning rate, consistency weight and the two memories' update rates and decays."""

    lr: float = 0.1
    reg_weight: float = 2.0  # lambda, weight of the consistency loss
    plastic_rate: float = 1.0  # r_P, probability of a plastic update per step
    plastic_decay: float = 0.99  # alpha_P
    stable_rate: float = 0.9  # r_S
    stable_decay: float = 0.99  # alpha_S


class EMA(NamedTuple):
    """One semantic memory: averaged parameters and its own model state (BatchNorm stats)."""

    params: PyTree
    model_state: PyTree


class State(NamedTuple):
    net: NetState  # the working model
    plastic: EMA
    stable: EMA
    buffer: reservoir.ReservoirState  # data = {"x": [cap, ...], "y": [cap]}
    pending: dict  # the last incoming batch, not yet written
    pending_valid: Array  # [B] bool
    step: Array  # int32: the code's global_step, steps taken so far


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes or an unknown optimizer."""
    er.check_config(cfg)


def init_state(model: Model, cfg: Config, key, x, hp) -> State:
    """Fresh working model; both memories start as copies of it; empty reservoir."""
    net = init_net(model, cfg.optimizer, key, x, hp.lr)
    base = er.state_around(cfg, net, x)
    copy = EMA(net.params, net.model_state)
    return State(net=net, plastic=copy, stable=copy, buffer=base.buffer, pending=base.pending,
                 pending_valid=base.pending_valid, step=jnp.zeros((), jnp.int32))


def select_targets(plastic_logits: Array, stable_logits: Array, y: Array) -> Array:
    """Per row, the logit vector [C] of the memory whose softmax gives ``y`` the higher
    probability: the stable model's where ``p_S(y) > p_P(y)`` strictly, else the plastic
    model's (CLS-ER Sec. 3.2, Eq. 2-3; the code's ``torch.where(sel_idx, ...)``). [R, C]."""
    pick = lambda logits: jnp.take_along_axis(  # noqa: E731
        jax.nn.softmax(logits, axis=-1), y[:, None], axis=-1)[:, 0]
    stable_wins = pick(stable_logits) > pick(plastic_logits)
    return jnp.where(stable_wins[:, None], stable_logits, plastic_logits)


def ema_decay(step: Array, decay) -> Array:
    """The decay used after ``step`` updates (``step`` >= 1, counted before the average is
    taken): ``min(1 - 1 / (step + 1), decay)``; the first update takes the mean of the
    memory and the working model."""
    return jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), decay)


def ema_update(ema: EMA, params: PyTree, step: Array, decay, take: Array) -> EMA:
    """``ema`` moved toward the working ``params`` by ``ema_decay(step, decay)`` when ``take``
    (the step's coin); its model state (BatchNorm statistics) is its own and stays."""
    a = ema_decay(step, decay)
    moved = jax.tree.map(lambda e, p: a * e + (1.0 - a) * p, ema.params, params)
    return ema._replace(params=jax.tree.map(lambda m, e: jnp.where(take, m, e), moved,
                                            ema.params))


def update_state(model: Model, cfg: Config, state: State, batch: Batch, hp, key):
    """One CLS-ER step: write the pending batch, draw replay rows, pick each row's target from
    the plastic or stable memory, step the working model, then update the memories."""
    k_er, k_coins = jax.random.split(key)
    k_write, k_read = jax.random.split(k_er)  # ER's keys: the read matches ER's exactly
    state, stream, x, y, valid = er.combined_rows(state, batch, k_write, k_read,
                                                  cfg.replay_batch)
    n = batch.y.shape[0]
    replay, mask = {"x": x[n:], "y": y[n:]}, valid[n:]
    # The stable model is also the one evaluated: without model state (no BatchNorm) its
    # forward on the incoming rows gives the online logits of the pre-update learner for free.
    stateless = not jax.tree.leaves(state.net.model_state)
    x_stable = x if stateless else replay["x"]
    stable_logits, _, stable_ms = model.apply(state.stable.params, state.stable.model_state,
                                              x_stable, True)
    plastic_logits, _, plastic_ms = model.apply(state.plastic.params,
                                                state.plastic.model_state, replay["x"], True)
    stable_replay = stable_logits[n:] if stateless else stable_logits
    # the code skips the memories' forward while the buffer is empty: their BatchNorm
    # statistics then see no filler rows
    if_read = lambda new, old: jax.tree.map(  # noqa: E731
        lambda a, b: jnp.where(mask.any(), a, b), new, old)
    stable_ms = if_read(stable_ms, state.stable.model_state)
    plastic_ms = if_read(plastic_ms, state.plastic.model_state)
    targets = jax.lax.stop_gradient(select_targets(plastic_logits, stable_replay, replay["y"]))

    def loss_fn(params, model_state):
        logits, _, model_state = model.apply(params, model_state, x, True)
        consistency = masked_mean(((logits[n:] - targets) ** 2).mean(-1), mask)
        loss = cross_entropy(logits, y, valid) + hp.reg_weight * consistency
        return loss, (logits, model_state)

    net, loss, _ = gradient_step(cfg.optimizer, state.net, loss_fn, hp.lr)
    step = state.step + 1
    u_plastic, u_stable = jax.random.uniform(k_coins, (2,))
    plastic = ema_update(EMA(state.plastic.params, plastic_ms), net.params, step,
                         hp.plastic_decay, u_plastic < hp.plastic_rate)
    stable = ema_update(EMA(state.stable.params, stable_ms), net.params, step,
                        hp.stable_decay, u_stable < hp.stable_rate)
    state = er.hold(state._replace(net=net, plastic=plastic, stable=stable, step=step), stream,
                    batch.fresh)
    return state, {"loss": loss, "stream_logits": stable_logits[:n] if stateless else None}


def make(model: Model, cfg: Config | None = None) -> Learner:
    """CLS-ER learner: ER on the working model with a consistency loss toward the better of a
    plastic and a stable EMA memory; predictions come from the stable memory."""
    cfg = cfg or Config()
    check_config(cfg)

    def init(key, x, hp) -> State:
        return init_state(model, cfg, key, x, hp)

    def update(state: State, batch: Batch, hp, key):
        return update_state(model, cfg, state, batch, hp, key)

    def predict(state: State, x, hp):
        del hp
        return model.apply(state.stable.params, state.stable.model_state, x, False)[0]

    def features(state: State, x, hp):
        del hp
        return model.apply(state.stable.params, state.stable.model_state, x, False)[1]

    return Learner(init, update, predict, identity_prepare_eval, HParams(), features=features)
