"""Experience Replay (ER) with a reservoir buffer.

Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning" (arXiv:1902.10486),
Sec. 3 and Algorithm 1 (ER with reservoir sampling, Sec. 3 "Writing into memory"): each step
trains on the incoming batch concatenated with ``replay_batch`` rows drawn uniformly from the
memory; the memory is a uniform reservoir sample (Vitter 1985) of everything seen so far.

Order of operations. As in the reference implementations, the rows replayed at step t are drawn
from the memory holding batches ``< t``. Rather than "read, train, then write" (which makes XLA
copy the whole buffer every step inside ``scan``: measured 2.5x slower on a prototype), the
write of batch t-1 is deferred to the start of step t: *write, then read*, with the same
semantics. ``pending`` holds the batch waiting to be written.

Loss. ``Config.replay_loss = "joint"`` (default) averages the cross-entropy over the incoming
and the valid replayed rows together: one batch of ``B + R`` rows, as in Chaudhry et al.'s
Algorithm 1 and Avalanche. ``"sum"`` adds the incoming rows' mean and the replayed rows' mean,
the convention of Mai et al.'s survey code and of the MIR and RAR authors' code (each mean
back-propagated separately before one optimizer step). With plain SGD and a full replay batch
of ``R = B`` rows (the usual 10 + 10), ``sum`` at ``lr`` is exactly ``joint`` at ``2 lr``: the
choice is a step size, and numbers from the two code bases compare only once it is matched.
MIR (``mir.py``) and RAR (``rar.py``) take the same setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ocljax import optim
from ocljax.errors import ConfigError, require_positive, unknown_choice
from ocljax.learners.supervised import (
    NetState,
    cross_entropy_step,
    gradient_step,
    init_net,
    net_learner,
    online_logits,
)
from ocljax.memory import reservoir
from ocljax.types import Array, Batch, Learner, Model


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_batch: int = 10
    optimizer: str = "sgd"
    replay_loss: str = "joint"  # "joint" (one mean over B + R rows) | "sum" (two means)


REPLAY_LOSSES = ("joint", "sum")


class HParams(NamedTuple):
    lr: float = 0.1


class State(NamedTuple):
    net: NetState
    buffer: reservoir.ReservoirState  # data = {"x": [cap, ...], "y": [cap]}
    pending: dict  # {"x": [B, ...], "y": [B]}: last incoming batch, not yet written
    pending_valid: Array  # [B] bool


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes."""
    require_positive(cfg, "buffer_size", "replay_batch")
    if cfg.replay_batch > cfg.buffer_size:
        raise ConfigError(
            f"replay_batch={cfg.replay_batch} rows cannot be drawn without replacement from a "
            f"buffer of {cfg.buffer_size}"
        )
    optim.check(cfg.optimizer)
    mode = getattr(cfg, "replay_loss", "joint")
    if mode not in REPLAY_LOSSES:
        raise ConfigError(unknown_choice("replay_loss", mode, REPLAY_LOSSES))


def replay_loss_weights(mode: str, n_stream: int, replay_weights: Array) -> tuple[Array, Array]:
    """``(weights [B + R'], norm)`` of the cross-entropy over ``B`` incoming rows followed by
    replayed rows whose own weights are ``replay_weights`` [R'] (the replay mask, or a mask split
    over several views of each row: weights of one replayed row sum to 1). The loss is
    ``sum(weights * per_row_ce) / norm``.

    ``joint``: every row weighs 1 (its replay weight), ``norm = B + sum(replay_weights)`` (one
    mean over stream and replay); ``sum``: incoming rows ``1 / B``, replayed rows
    ``w / max(sum(replay_weights), 1)``, ``norm = 1`` (the mean of each part, added).
    """
    w = replay_weights.astype(jnp.float32)
    stream = jnp.ones((n_stream,), jnp.float32)
    if mode == "joint":
        return jnp.concatenate([stream, w]), n_stream + w.sum()
    if mode == "sum":
        return jnp.concatenate([stream / n_stream, w / jnp.maximum(w.sum(), 1.0)]), 1.0
    raise ConfigError(unknown_choice("replay_loss", mode, REPLAY_LOSSES))


def replay_step(model: Model, cfg, net: NetState, stream: dict, replay: dict, replay_mask,
                lr) -> tuple[NetState, Array, Array]:
    """One optimizer step on the incoming rows plus the replayed rows, combined as
    ``cfg.replay_loss`` says (``replay_loss_weights``). Returns ``(net, loss, logits [B + R])``.

    ``joint`` goes through ``cross_entropy_step`` with the row mask (the original ER path,
    bit for bit)."""
    x = jnp.concatenate([stream["x"], replay["x"]])
    y = jnp.concatenate([stream["y"], replay["y"]])
    n_stream = stream["y"].shape[0]
    if cfg.replay_loss == "joint":
        mask = jnp.concatenate([jnp.ones((n_stream,), bool), replay_mask])
        return cross_entropy_step(model, cfg.optimizer, net, x, y, mask, lr)
    weights, norm = replay_loss_weights(cfg.replay_loss, n_stream, replay_mask)

    def loss_fn(params, model_state):
        logits, _, model_state = model.apply(params, model_state, x, True)
        per_row = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return (weights * per_row).sum() / norm, (logits, model_state)

    return gradient_step(cfg.optimizer, net, loss_fn, lr)


def init_state(model: Model, cfg: Config, key, x, hp) -> State:
    """Fresh network, empty buffer and nothing pending; ``x`` [B, ...] is an example batch."""
    return state_around(cfg, init_net(model, cfg.optimizer, key, x, hp.lr), x)


def state_around(cfg, net: NetState, x) -> State:
    """An ER state holding ``net`` (any parameter pytree: learners that train more than the
    model, e.g. a head or proxies, pass their own), an empty buffer of ``cfg.buffer_size``
    rows shaped like the example batch ``x`` [B, ...], and nothing pending."""
    example = {"x": x, "y": jnp.zeros((x.shape[0],), jnp.int32)}
    return State(
        net=net,
        buffer=reservoir.init(cfg.buffer_size, example),
        pending=jax.tree.map(jnp.zeros_like, example),
        pending_valid=jnp.zeros((x.shape[0],), bool),
    )


def combined_rows(state, batch: Batch, k_write, k_read, n_replay: int):
    """Write the pending batch (at a fresh step) and draw ``n_replay`` rows to replay with the
    incoming ones: ``(state, stream, x, y, valid)``, ``x`` and ``y`` the incoming rows followed
    by the replayed ones, ``valid`` [B + n_replay] False for replay rows that do not exist yet.
    ``k_write`` and ``k_read`` are the write's and the read's keys."""
    state = flush(state, k_write, batch.fresh)
    stream = {"x": batch.x, "y": batch.y}
    replay, replay_mask = replay_rows(state.buffer, k_read, n_replay, stream)
    x = jnp.concatenate([batch.x, replay["x"]])
    y = jnp.concatenate([batch.y, replay["y"]])
    valid = jnp.concatenate([jnp.ones_like(batch.y, bool), replay_mask])
    return state, stream, x, y, valid


def flush(state: State, key, when=True, add=reservoir.add) -> State:
    """Write the pending batch into the buffer if ``when`` (a traced bool is fine), with
    ``add(buffer, items, key, valid) -> buffer``: the reservoir's by default, a learner's own
    memory update otherwise (ASER's)."""
    write = state.pending_valid & when
    buffer = add(state.buffer, state.pending, key, write)
    return state._replace(buffer=buffer, pending_valid=state.pending_valid & ~write)


def replay_rows(buffer, key, n: int, stream: dict) -> tuple[dict, Array]:
    """``n`` rows drawn without replacement from ``buffer`` and their mask [n].

    While the buffer holds fewer than ``n`` rows, the missing ones are copies of stream rows
    (``with_filler``).
    """
    rows, mask = reservoir.sample(buffer, key, n)
    return with_filler(rows, mask, stream), mask


def with_filler(rows: dict, mask: Array, stream: dict) -> dict:
    """``rows`` (leaves [n, ...]) with the rows where ``mask`` [n] is False replaced by copies
    of the incoming ``stream`` rows (cyclically): they are masked out of the loss, but unlike
    zero rows they leave BatchNorm's batch statistics those of real data (exactly the
    stream-only statistics when the buffer is empty and ``n`` equals the stream batch size)."""
    n = mask.shape[0]
    b = stream["y"].shape[0]
    filler = jax.tree.map(lambda a: a[jnp.arange(n) % b], stream)
    pick = lambda r, f: jnp.where(mask.reshape(-1, *([1] * (r.ndim - 1))), r, f)  # noqa: E731
    return jax.tree.map(pick, rows, filler)


def hold(state, stream: dict, fresh) -> State:
    """``state`` with the incoming batch ``stream`` pending (written at the next fresh step)
    when ``fresh``; on repeat passes the earlier pending batch stays. Works for any learner
    state with ER's ``pending`` / ``pending_valid`` fields."""
    keep = lambda new, old: jnp.where(fresh, new, old)  # noqa: E731
    n_stream = jax.tree.leaves(stream)[0].shape[0]
    return state._replace(
        pending=jax.tree.map(keep, stream, state.pending),
        pending_valid=keep(jnp.ones((n_stream,), bool), state.pending_valid),
    )


def update_state(model: Model, cfg: Config, state: State, batch: Batch, hp, key):
    """One ER step: write the pending batch, replay, train on stream + replay rows.

    A batch is written once, at the first fresh step after it arrived; its repeat passes
    (``batch.fresh`` False) replay only earlier batches, as in the surveys' ``mem_iters``.
    """
    k_write, k_read = jax.random.split(key)
    state = flush(state, k_write, batch.fresh)
    stream = {"x": batch.x, "y": batch.y}
    replay, replay_mask = replay_rows(state.buffer, k_read, cfg.replay_batch, stream)
    net, loss, logits = replay_step(model, cfg, state.net, stream, replay, replay_mask, hp.lr)
    state = hold(state._replace(net=net), stream, batch.fresh)
    return state, {"loss": loss,
                   "stream_logits": online_logits(net, logits[:batch.y.shape[0]])}


def make(model: Model, cfg: Config | None = None) -> Learner:
    """ER learner for ``model`` with a reservoir buffer of ``cfg.buffer_size`` rows."""
    cfg = cfg or Config()
    check_config(cfg)
    return net_learner(model, partial(init_state, model, cfg),
                       partial(update_state, model, cfg), HParams())
