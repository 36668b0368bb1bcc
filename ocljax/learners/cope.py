"""Continual Prototype Evolution (CoPE): class prototypes that evolve online by momentum, a
pseudo-prototypical proxy (PPP) loss in a normalised embedding space, and a class-balanced
replay memory; prediction by the nearest prototype.

De Lange & Tuytelaars 2021, "Continual Prototype Evolution: Learning Online from Non-Stationary
Data Streams" (ICCV 2021, arXiv:2009.00919), checked against the authors' code
(``Mattdl/ContinualPrototypeEvolution``: ``model/prototypical/CoPE.py``, ``loss_scheme.py``
``PPPloss``, ``p_scheme.py``, ``mem_scheme.py``, ``sample_scheme.py``, and ``main_MNIST.sh``
for the settings). Each step:

1. the incoming batch and ``replay_batch`` rows read class-balanced from the memory
   (``ocljax.memory.class_reservoir``) go through the network and an embedding layer
   (Linear F -> ``embed_dim``; the code's MLP ends in that layer) in one forward pass; the
   embeddings ``f_i`` are L2-normalised. A class's prototype ``p_c`` (random at first, as the
   code's uniform(0, 1) vector, normalised) exists from the step its class is first seen;
2. the PPP loss (``ppp_loss``) over the combined batch B, with ``T`` the temperature and, for a
   row j and a class c, ``Z_c(j) = sum_{k seen, k != c} exp(p_k . f_j / T)`` (the other
   classes' prototypes, including j's own when c is not its class):

   - attractor, for each row i of class c: its candidates are the other rows of c in the batch
     (pseudo-prototypes) and ``p_c``, each scored against the other prototypes alone,
     ``P_att(i) = (1 / |B_c|) sum_u e(u, i) / (e(u, i) + Z_c(i))`` with
     ``e(u, i) = exp(u . f_i / T)``; the candidates get no gradient;
   - repellor, for each row i of class c and each row j of another class:
     ``log(1 - (P_ij + Q_j) / 2)`` with ``P_ij = a / (a + Z_c(j))``, ``a = exp(f_i . f_j / T)``
     (gradient through both rows) and ``Q_j = b / (b + Z_c(j))``, ``b = exp(p_c . f_j / T)``;
   - ``L = -(sum_i log P_att(i) + sum_{i, j} log(1 - (P_ij + Q_j) / 2)) / |B|``: summed over
     rows and pairs, divided by the number of rows only, as in the code. Prototypes never get
     a gradient. No step is taken until two classes have been seen (the code's
     ``len(class_mem) > 1``);
3. one optimizer step on the network and the embedding layer;
4. every class c with rows in the batch moves its prototype towards their mean embedding,
   ``p_c <- momentum p_c + (1 - momentum) mean_{i in B_c} f_i``, with the embeddings of the
   step's forward pass (before the update, as in the code) and no re-normalisation (the
   authors' README: re-normalising slightly lowers accuracy);
5. the incoming batch is offered to the memory (at the next step, as ER's ``pending`` rows).

Prediction (``predict``): ``p_c . f`` for the normalised embedding ``f`` of the input and every
class seen so far (the code's nearest prototype: prototypes are not unit vectors, so this is
the code's dot product, not a cosine); classes not seen yet score ``-1e9``.

Deviations from the authors' code:

- With ``--passes k`` (the code's ``n_iter``) every pass moves the prototypes with that pass's
  rows; the code accumulates the replayed rows of all passes and the incoming rows once, and
  moves the prototypes after the last pass. Identical for one pass (the default).
- On the very first batch (empty memory) the code moves the prototypes twice with the
  incoming rows (once before the loss, a quirk of its ``pre_loss`` branch), so when that batch
  already holds two classes its loss sees prototypes moved once; here they move once, after.
- The memory's deviations are listed in ``ocljax.memory.class_reservoir`` (same distribution
  of what is stored).
- The code computes the loss in probabilities; here in log space (``log_sigmoid`` and
  ``logsumexp``), the same numbers without overflow at small temperatures.

Defaults: the authors' split-MNIST command line (``main_MNIST.sh``): SGD ``lr`` 0.01, batch 10,
replay as many rows as the batch (``replay_batch`` 10), ``embed_dim`` 100, ``temperature`` 0.1,
``momentum`` 0.99, one pass. The code's memory there is 200 rows per class (2,000); the default
here is the library's 1,000 rows, set ``--set buffer_size=2000`` for the code's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax import optim
from ocljax.errors import ConfigError
from ocljax.learners import er
from ocljax.learners.er_ncm import unit_rows
from ocljax.learners.supervised import (
    NetState,
    backbone_features,
    backbone_probe,
    gradient_step,
    online_logits,
)
from ocljax.memory import class_reservoir
from ocljax.types import Array, Batch, Learner, Model, identity_prepare_eval

__all__ = ["Config", "HParams", "State", "check_config", "embed", "init_embedding",
           "init_prototypes", "make", "move_prototypes", "ppp_loss", "prototype_logits"]

UNSEEN = -1e9  # score of a class not seen yet


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_batch: int = 10  # rows read from the memory per step (the code: the batch size)
    embed_dim: int = 100  # size of the embedding the prototypes live in
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.01
    temperature: float = 0.1
    momentum: float = 0.99  # prototype momentum (the code's p_momentum)


class State(NamedTuple):
    net: NetState  # params = {"net": model params, "embed": {"w", "b"}}
    buffer: class_reservoir.ClassReservoirState  # data = {"x", "y"}
    pending: dict  # last incoming batch, written at the next fresh step
    pending_valid: Array  # [B] bool
    prototypes: Array  # [C, D] float32, meaningful where ``seen``
    seen: Array  # [C] bool, classes that have been in an incoming batch


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes or an unknown optimizer."""
    er.check_config(cfg)
    if cfg.embed_dim < 1:
        raise ConfigError(f"embed_dim must be >= 1, got {cfg.embed_dim}")


def init_embedding(key: Array, feature_dim: int, embed_dim: int) -> dict:
    """The embedding layer Linear(F, D): Xavier-uniform weights and zero bias, the
    initialisation of the authors' MLP."""
    bound = jnp.sqrt(6.0 / (feature_dim + embed_dim))
    return {"w": jax.random.uniform(key, (feature_dim, embed_dim), jnp.float32, -bound, bound),
            "b": jnp.zeros((embed_dim,), jnp.float32)}


def init_prototypes(key: Array, num_classes: int, embed_dim: int) -> Array:
    """Initial prototypes [C, D]: uniform(0, 1) vectors, L2-normalised (the code's
    ``init_prototype_val``, drawn for all classes at once)."""
    return unit_rows(jax.random.uniform(key, (num_classes, embed_dim), jnp.float32))


def embed(params: dict, features: Array) -> Array:
    """L2-normalised embeddings [N, D] of backbone ``features`` [N, F]."""
    return unit_rows(features.astype(jnp.float32) @ params["w"] + params["b"])


def prototype_logits(f: Array, prototypes: Array, seen: Array) -> Array:
    """``f . p_c`` [N, C] for the seen classes, ``UNSEEN`` for the others (prediction)."""
    return jnp.where(seen[None, :], f @ prototypes.T, UNSEEN)


def ppp_loss(f: Array, labels: Array, valid: Array, prototypes: Array, seen: Array,
             temperature) -> Array:
    """The PPP loss (module docstring, step 2) of normalised embeddings ``f`` [M, D] with
    ``labels`` [M] and ``valid`` [M] (rows that take part), against ``prototypes`` [C, D]
    (no gradient) of the ``seen`` [C] classes, which must include every valid row's class.
    Rows, not classes, are the unit: the sum over rows and pairs over the valid row count."""
    f = f.astype(jnp.float32)
    num_classes = prototypes.shape[0]
    p = jax.lax.stop_gradient(prototypes)
    to_proto = f @ p.T / temperature  # [M, C]: p_k . f_j / T
    classes = jnp.arange(num_classes)
    others = seen[None, :] & (classes[:, None] != classes[None, :])  # [c, k]
    # log Z_c(j) [M, C]; a large finite fill keeps gradients finite when no class remains.
    log_z = jax.nn.logsumexp(jnp.where(others[None], to_proto[:, None, :], -1e9), axis=-1)
    same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    n_class = same.sum(1)  # |B_c| for each row's class (itself included)
    own_z = jnp.take_along_axis(log_z, labels[:, None], axis=1)[:, 0]  # log Z_{y_i}(i)
    # Attractor: candidates u = the other rows of i's class (no gradient) and p_{y_i}.
    to_rows = f @ jax.lax.stop_gradient(f).T / temperature  # [i, j]: f_j . f_i / T, query i
    log_p_rows = to_rows - jnp.logaddexp(to_rows, own_z[:, None])
    own_proto = jnp.take_along_axis(to_proto, labels[:, None], axis=1)[:, 0]
    log_p_proto = own_proto - jnp.logaddexp(own_proto, own_z)
    eye = jnp.eye(labels.shape[0], dtype=bool)
    log_p_rows = jnp.where(same & ~eye, log_p_rows, -jnp.inf)
    log_att = jax.nn.logsumexp(jnp.concatenate([log_p_rows, log_p_proto[:, None]], axis=1),
                               axis=1) - jnp.log(jnp.maximum(n_class, 1))
    attract = jnp.where(valid, log_att, 0.0).sum()
    # Repellor: pairs (i of class c, j of another class), c = y_i.
    a = f @ f.T / temperature  # gradient through both rows
    b = to_proto[:, labels].T  # [i, j]: p_{y_i} . f_j / T
    lz = log_z[:, labels].T  # [i, j]: log Z_{y_i}(j)
    term = jnp.logaddexp(jax.nn.log_sigmoid(lz - a), jax.nn.log_sigmoid(lz - b)) - jnp.log(2.0)
    pairs = valid[:, None] & valid[None, :] & (labels[:, None] != labels[None, :])
    repel = jnp.where(pairs, term, 0.0).sum()
    return -(attract + repel) / jnp.maximum(valid.sum(), 1)


def move_prototypes(prototypes: Array, f: Array, labels: Array, valid: Array,
                    momentum) -> Array:
    """``p_c <- momentum p_c + (1 - momentum) mean f_i`` over the valid rows of class c, for
    each class with such rows (no re-normalisation); other prototypes are unchanged."""
    onehot = jax.nn.one_hot(labels, prototypes.shape[0]) * valid[:, None]  # [M, C]
    counts = onehot.sum(0)
    means = (onehot.T @ f.astype(jnp.float32)) / jnp.maximum(counts, 1.0)[:, None]
    moved = momentum * prototypes + (1.0 - momentum) * means
    return jnp.where((counts > 0)[:, None], moved, prototypes)


def make(model: Model, cfg: Config | None = None) -> Learner:
    """CoPE learner for ``model``: class-balanced memory, PPP loss, momentum prototypes,
    nearest-prototype prediction."""
    cfg = cfg or Config()
    check_config(cfg)
    C, F = model.num_classes, model.feature_dim
    if cfg.buffer_size < C:
        raise ConfigError(f"buffer_size={cfg.buffer_size} leaves some of the {C} classes a "
                          f"quota of 0 rows in CoPE's class-balanced memory: use at least {C}")
    features = backbone_features(model)

    def embeddings(params, model_state, x, train):
        feats, model_state = features(params, model_state, x, train)
        return embed(params["embed"], feats), model_state

    def init(key, x, hp: HParams) -> State:
        params, model_state = model.init(key, x)  # same network as er's for the same key
        params = {"net": params,
                  "embed": init_embedding(jax.random.fold_in(key, 1), F, cfg.embed_dim)}
        net = NetState(params, model_state, optim.build(cfg.optimizer, hp.lr).init(params))
        example = {"x": x, "y": jnp.zeros((x.shape[0],), jnp.int32)}
        return State(
            net=net,
            buffer=class_reservoir.init(cfg.buffer_size, example, C),
            pending=jax.tree.map(jnp.zeros_like, example),
            pending_valid=jnp.zeros((x.shape[0],), bool),
            prototypes=init_prototypes(jax.random.fold_in(key, 2), C, cfg.embed_dim),
            seen=jnp.zeros((C,), bool),
        )

    def update(state: State, batch: Batch, hp: HParams, key):
        """Write the pending batch, read class-balanced, one PPP step, move the prototypes."""
        k_write, k_read = jax.random.split(key)
        state = er.flush(state, k_write, batch.fresh, add=class_reservoir.add)
        stream = {"x": batch.x, "y": batch.y}
        replay, mask = class_reservoir.sample(state.buffer, k_read, cfg.replay_batch)
        replay = er.with_filler(replay, mask, stream)
        x = jnp.concatenate([batch.x, replay["x"]])
        y = jnp.concatenate([batch.y, replay["y"]])
        valid = jnp.concatenate([jnp.ones_like(batch.y, bool), mask])
        seen = state.seen | (jax.nn.one_hot(batch.y, C) > 0).any(0)
        train = seen.sum() >= 2

        def loss_fn(params, model_state):
            f, model_state = embeddings(params, model_state, x, True)
            loss = ppp_loss(f, y, valid, state.prototypes, seen, hp.temperature)
            return jnp.where(train, loss, 0.0), (jax.lax.stop_gradient(f), model_state)

        stepped, loss, f = gradient_step(cfg.optimizer, state.net, loss_fn, hp.lr)
        # before two classes the code takes no optimizer step (Adam's count does not advance);
        # the training forward still ran, so BatchNorm's statistics are the new ones
        keep = lambda new, old: jnp.where(train, new, old)  # noqa: E731
        net = stepped._replace(params=jax.tree.map(keep, stepped.params, state.net.params),
                               opt_state=jax.tree.map(keep, stepped.opt_state,
                                                      state.net.opt_state))
        prototypes = move_prototypes(state.prototypes, f, y, valid, hp.momentum)
        stream_logits = prototype_logits(f[:batch.y.shape[0]], state.prototypes, state.seen)
        state = er.hold(state._replace(net=net, prototypes=prototypes, seen=seen), stream,
                        batch.fresh)
        return state, {"loss": loss, "stream_logits": online_logits(net, stream_logits)}

    def predict(state: State, x, hp: HParams) -> Array:
        """``f . p_c`` [N, C] for the seen classes (``prototype_logits``), evaluation mode."""
        del hp
        f, _ = embeddings(state.net.params, state.net.model_state, x, False)
        return prototype_logits(f, state.prototypes, state.seen)

    return Learner(init, update, predict, identity_prepare_eval, HParams(),
                   features=backbone_probe(model))
