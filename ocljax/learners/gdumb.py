"""GDumb: a greedy class-balanced memory, and a network trained from scratch on it to evaluate.

Prabhu, Torr & Dokania 2020, "GDumb: A Simple Approach that Questions Our Progress in Continual
Learning" (ECCV 2020), Sec. 3: a *sampler* greedily stores the stream in a class-balanced
memory (``ocljax.memory.balanced``), and a *learner* trains a fresh network on that memory
only, whenever a prediction is needed, masking the classes the memory does not hold.

Here ``update`` only writes fresh batches into the memory: the network is not trained and the
reported loss is 0. Online (test-then-train) accuracy is therefore that of the untrained initial
network, since GDumb has no model during the stream. ``prepare_eval`` builds the evaluation
model: a fresh network, initialised exactly like the initial one (from the key the state was
initialised with), trained for ``retrain_epochs`` passes over the memory in shuffled minibatches
of ``retrain_batch`` rows; the shuffles also come from the state's own key, not from
``prepare_eval``'s, so the evaluation model is a function of the memory contents (and the
seed) alone: two members whose memories are identical evaluate identically, and repeated
evaluations of an unchanged memory agree. While the memory is not full, an epoch is a pass over
its filled rows; the last minibatch is padded with copies of filled rows that are masked out of
the loss (they keep BatchNorm's batch statistics those of real data), and steps with no filled
row are skipped. Everything runs in ``lax.fori_loop`` / ``lax.scan``, so it compiles once.
``predict`` on a prepared state gives the classes absent from memory ``-inf`` logits.

Training recipe (the authors' code, drimpossible/GDumb ``src/main.py``): batch 16; SGD with a
maximum lr of 0.05 (``HParams.lr``), one warm-up epoch at a tenth of it, then cosine annealing
with warm restarts (Loshchilov & Hutter 2017, SGDR; ``T_0 = 1``, ``T_mult = 2``, stepped per
epoch) down to ``min_lr = 0.0005``. That schedule is implemented (``schedule="sgdr"``;
``"constant"`` keeps ``lr``). Deviations: the optimizer is the library's (``optimizer="sgd"``:
plain SGD, no momentum 0.9, no weight decay 1e-6, no gradient clipping at norm 10), so the
fused SGD path and the optimizer choice stay shared with the other learners; no data
augmentation (the paper uses no cutmix on MNIST; the code also random-crops, omitted here);
full precision rather than fp16.

Defaults and cost. ``buffer_size=1000`` matches the other replay learners' MNIST setting (the
paper's MNIST runs use 300, 500 or 4,400 rows with an MLP of width 100 or 400), so GDumb is
compared at equal memory. ``retrain_epochs=16`` instead of the paper's 128: every call of
``prepare_eval`` (each continual evaluation, and every task end) retrains from scratch, costing
``retrain_epochs * ceil(buffer_size / retrain_batch)`` steps (1,008 with the defaults, about
the cost of ER's whole first task, per evaluation); 16 epochs end a full SGDR cycle (epochs
8-15 anneal to near ``min_lr``) and are affordable at each task end on CPU. With GDumb, run
with ``eval_every=0`` (evaluate at task ends only) unless the continual-evaluation curve is
wanted: each extra evaluation is another full retraining. Raise ``retrain_epochs`` (a power
of two ends a cycle) on an accelerator.

Measured (Split MNIST, task-free, MLP 784-256-256-10, buffer 1000, one seed, 2-core CPU):
``python -m experiments.split_mnist --learner gdumb --set eval_every=0 --set lr=0.05`` (a
``--set`` is needed: the preset's own ``--set eval_every=100`` overrides ``--eval-every``)
gives 0.890 final average accuracy with 16 epochs, 0.890 with 32; the preset's ``lr=0.1``
gives 0.899 with 32. With ``eval_every=100`` the same run retrains 65 times and takes ~5x
longer; its final accuracy is unchanged, since the model depends only on the memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax import optim
from ocljax.errors import ConfigError, require_positive, unknown_choice
from ocljax.learners.supervised import (
    NetState,
    cross_entropy_step,
    init_net,
    net_features,
    predict_logits,
)
from ocljax.memory import balanced
from ocljax.types import Array, Batch, Learner, Model

SCHEDULES = ("sgdr", "constant")


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    retrain_epochs: int = 16
    retrain_batch: int = 16
    schedule: str = "sgdr"
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.05  # the retraining's maximum learning rate
    min_lr: float = 0.0005  # SGDR's floor (eta_min)


class State(NamedTuple):
    net: NetState  # the untrained initial network; the retrained one in prepared states
    memory: balanced.BalancedState  # data = {"x": [cap, ...], "y": [cap]}
    key: Array  # the key the state was initialised with: seeds the network and the shuffles
    prepared: Array  # [] bool, True only in states returned by prepare_eval


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible settings."""
    require_positive(cfg, "buffer_size", "retrain_epochs", "retrain_batch")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(unknown_choice("schedule", cfg.schedule, SCHEDULES))
    optim.check(cfg.optimizer)


def epoch_lr(epoch: Array, lr, min_lr, schedule: str = "sgdr") -> Array:
    """Learning rate of retraining epoch ``epoch`` (0-based).

    ``sgdr``, as in the authors' code: epoch 0 warms up at ``lr / 10``; epoch ``e >= 1`` is
    step ``s = e - 1`` of cosine annealing with warm restarts (``T_0 = 1``, ``T_mult = 2``):
    with ``T`` the largest power of two ``<= s + 1`` and ``t = s + 1 - T``,
    ``min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2`` (restarts at epochs 1, 2, 4, 8, ...).
    """
    if schedule == "constant":
        return jnp.asarray(lr, jnp.float32) * jnp.ones((), jnp.float32)
    m = jnp.maximum(jnp.asarray(epoch, jnp.int32), 1)  # s + 1
    period = jnp.left_shift(jnp.int32(1), 31 - jax.lax.clz(m))
    t = (m - period).astype(jnp.float32)
    cosine = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t / period))
    return jnp.where(epoch == 0, 0.1 * lr, cosine).astype(jnp.float32)


def net_key(key: Array) -> Array:
    """Key of the initial (and every retrained) network, derived from the state's key."""
    return jax.random.fold_in(key, 0)


def shuffle_key(key: Array) -> Array:
    """Key of the retraining's per-epoch shuffles, derived from the state's key."""
    return jax.random.fold_in(key, 1)


def retrain(model: Model, cfg: Config, memory: balanced.BalancedState, key: Array,
            hp: HParams) -> NetState:
    """A fresh network trained on the filled rows of ``memory`` only (see the module doc)."""
    cap, b = balanced.capacity(memory), cfg.retrain_batch
    steps = -(-cap // b)
    n = balanced.size(memory)
    x_all, y_all = memory.data["x"], memory.data["y"]
    net = init_net(model, cfg.optimizer, net_key(key), x_all[:b], hp.lr)
    k_shuffle = shuffle_key(key)

    def epoch(e, net):
        scores = jax.random.uniform(jax.random.fold_in(k_shuffle, e), (cap,))
        order = jnp.argsort(jnp.where(jnp.arange(cap) < n, scores, 2.0))  # filled rows first
        lr = epoch_lr(e, hp.lr, hp.min_lr, cfg.schedule)

        def step(net, i):
            pos = i * b + jnp.arange(b)
            mask = pos < n
            rows = order[pos % jnp.maximum(n, 1)]  # padding: copies of filled rows, masked

            def train(net):
                new, _, _ = cross_entropy_step(model, cfg.optimizer, net, x_all[rows],
                                               y_all[rows], mask, lr)
                return new

            return jax.lax.cond(mask[0], train, lambda net: net, net), None

        net, _ = jax.lax.scan(step, net, jnp.arange(steps))
        return net

    return jax.lax.fori_loop(0, cfg.retrain_epochs, epoch, net)


def masked_logits(logits: Array, present: Array) -> Array:
    """``-inf`` for the classes not ``present`` [C] (all kept when none is present)."""
    present = present | ~present.any()
    return jnp.where(present[None], logits, -jnp.inf)


def make(model: Model, cfg: Config | None = None) -> Learner:
    """GDumb learner for ``model`` with a balanced memory of ``cfg.buffer_size`` rows."""
    cfg = cfg or Config()
    check_config(cfg)

    def init(key, x, hp: HParams) -> State:
        example = {"x": x, "y": jnp.zeros((x.shape[0],), jnp.int32)}
        return State(
            net=init_net(model, cfg.optimizer, net_key(key), x, hp.lr),
            memory=balanced.init(cfg.buffer_size, example, model.num_classes),
            key=key,
            prepared=jnp.zeros((), bool),
        )

    def update(state: State, batch: Batch, hp: HParams, key):
        del hp
        valid = jnp.broadcast_to(batch.fresh, batch.y.shape)
        memory = balanced.add(state.memory, {"x": batch.x, "y": batch.y}, key, valid)
        state = state._replace(memory=memory, prepared=jnp.zeros((), bool))
        return state, {"loss": jnp.zeros((), jnp.float32)}

    def prepare_eval(state: State, hp: HParams, key) -> State:
        del key  # the evaluation model depends on the memory and the state's key only
        net = retrain(model, cfg, state.memory, state.key, hp)
        return state._replace(net=net, prepared=jnp.ones((), bool))

    def predict(state: State, x, hp: HParams):
        del hp
        logits = predict_logits(model, state.net, x)
        present = balanced.class_counts(state.memory) > 0
        return jnp.where(state.prepared, masked_logits(logits, present), logits)

    return Learner(init, update, predict, prepare_eval, HParams(),
                   features=net_features(model))
