"""Gradient-based Sample Selection, greedy variant (GSS-Greedy).

Aljundi, Lin, Goujaud & Bengio 2019, "Gradient based sample selection for online continual
learning" (NeurIPS 2019), Sec. 3.3 and Algorithm 2. The memory keeps ``buffer_size`` rows and a
score per row. For an incoming sample (x, y) with gradient g, draw ``candidates`` random memory
rows with per-sample gradients G_1..G_n and score it

    c = max_i cos(g, G_i) + 1                 (in [0, 2]; low = gradient unlike the memory's)

While the memory is not full the sample is added with score c. Once full, a sample with
``c < 1`` (negative cosine to every candidate) competes for a slot i drawn with probability
``C_i / sum_j C_j`` and replaces it, taking score c, with probability ``C_i / (C_i + c)``;
a sample whose gradient resembles the memory's (c >= 1) is rejected. A sample offered to an
empty memory gets the score 0.1 on this shifted scale, Mammoth's value; the official code's
0.1 is a raw cosine (``GSS_Greedy.py``), 1.1 on this scale. It concerns only the first batch's
rows, which with 0.1 are almost never drawn for replacement. Samples of one incoming batch
are decided in order (``lax.scan``), each seeing the fill level and scores left by the
previous ones.

Training is ER-style, as in Mammoth's GSS: each step is one SGD step on the incoming batch
concatenated with ``replay_batch`` rows drawn uniformly from the memory
(``ocljax.learners.er.replay_rows``).

Details and deviations.

* Order: Algorithm 2 trains on the batch first ("Update"), then selects with the updated
  parameters. The selection of batch t runs at the start of step t+1 (the deferred write of
  ``ocljax.learners.er``, which avoids copying the memory every step); nothing changes the
  parameters in between, so the gradients are the same. With repeated passes a batch is
  selected once, after its last pass.
* The candidate rows are drawn once per incoming batch and shared by its samples (as in
  Mammoth's ``gss_buffer``); Algorithm 2 draws them per sample, which for batch 10 costs 10x
  the candidate gradients for little change.
* Per-sample gradients use evaluation mode (Mammoth's ``get_grads``), so a BatchNorm model is
  not normalised by a batch of one. Only their inner products enter the score. When every
  parameter belongs to a ``flax.linen.Dense`` layer applied once to [rows, features] inputs
  (the MLPs), ``dense_gram`` computes them exactly without the per-sample gradients: row i's
  kernel gradient is the outer product ``a_i (x) d_i`` of the layer's input and output
  gradient, so ``<g_i, g_j> = sum over layers (a_i . a_j + 1) (d_i . d_j)`` (the 1 for the
  bias; Goodfellow 2015, "Efficient per-example gradient computations"). That is one forward
  and backward pass on the 20 rows instead of 20 raveled gradients of every parameter: 8-9x
  faster per step for the 2x256 MLP (``benchmarks.gss_scoring``). In other models the Dense
  layers take the same shortcut and only the remaining parameters (convolutions, BatchNorm)
  get per-sample gradients, of those parameters alone: the small CNN keeps 98% of its
  parameters in Dense layers. Models whose Dense layers do not fit the rule (one reused,
  one applied to a [rows, ..., features] input) use ``vmap`` of ``grad`` over every
  parameter (``per_sample_grads``).
* The candidates' gradients are per-sample, as in Algorithm 2 (the official GSS_Greedy code
  compares with gradients of memory mini-batches instead).

Recommended: the paper's MNIST settings are batch 10, MLP 2x100, ``buffer_size=300``,
``candidates=10`` (its ``n``), SGD lr 0.05, 3 iterations per batch; the library defaults
(``buffer_size=1000``, ``replay_batch=10``, ``candidates=10``, lr 0.1) follow the OCL surveys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ocljax import optim
from ocljax.errors import ConfigError, require_positive
from ocljax.learners import er
from ocljax.learners.supervised import (
    NetState,
    cross_entropy_step,
    init_net,
    net_learner,
    online_logits,
)
from ocljax.losses import cross_entropy
from ocljax.memory import reservoir
from ocljax.types import Array, Batch, Learner, Model

EMPTY_SCORE = 0.1  # score of a sample offered to an empty memory (Mammoth; see the docstring)


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_batch: int = 10
    candidates: int = 10  # memory rows whose gradients score a new sample (n in Algorithm 2)
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.1


class State(NamedTuple):
    net: NetState
    buffer: reservoir.ReservoirState  # data = {"x", "y"}; n_seen: samples offered so far
    scores: Array  # [buffer_size] float32, score C_i of each filled slot
    pending: dict  # {"x": [B, ...], "y": [B]}: last incoming batch, not yet selected
    pending_valid: Array  # [B] bool


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes."""
    require_positive(cfg, "buffer_size", "replay_batch", "candidates")
    for name in ("replay_batch", "candidates"):
        if getattr(cfg, name) > cfg.buffer_size:
            raise ConfigError(
                f"{name}={getattr(cfg, name)} rows cannot be drawn without replacement from a "
                f"buffer of {cfg.buffer_size}"
            )
    optim.check(cfg.optimizer)


def per_sample_grads(model: Model, net: NetState, x: Array, y: Array) -> Array:
    """Flattened gradient of each row's cross-entropy, evaluation mode: [N, P]."""

    def one(xi, yi):
        def loss(params):
            logits, _, _ = model.apply(params, net.model_state, xi[None], False)
            return cross_entropy(logits, yi[None])

        return ravel_pytree(jax.grad(loss)(net.params))[0]

    return jax.vmap(one)(x, y)


def gss_scores(g: Array, G: Array, mask: Array) -> Array:
    """Score of each new gradient ``g`` [B, P] against candidate gradients ``G`` [n, P]
    (``mask`` [n] marks real candidates): ``max_i cos(g_b, G_i) + 1``, 0.1 with none."""
    return scores_from_products(g @ G.T, jnp.linalg.norm(g, axis=1), jnp.linalg.norm(G, axis=1),
                                mask)


def scores_from_products(dots: Array, norm_g: Array, norm_G: Array, mask: Array) -> Array:
    """``gss_scores`` from the inner products ``dots`` [B, n] = ``g @ G.T`` and the norms
    ``norm_g`` [B], ``norm_G`` [n]."""
    cos = dots / jnp.maximum(norm_g[:, None] * norm_G[None, :], 1e-12)
    best = jnp.where(mask[None, :], cos, -jnp.inf).max(axis=1)
    return jnp.where(mask.any(), best + 1.0, EMPTY_SCORE)


def dense_gram(model: Model, net: NetState, x: Array, y: Array) -> Array | None:
    """Gram matrix [N, N] of the rows' per-sample gradients (as ``per_sample_grads`` gives
    them, raveled). Each Dense layer contributes ``(a a^T + 1) * (d d^T)`` from its inputs
    ``a`` and output gradients ``d``, without forming its gradients; parameters outside Dense
    layers (convolutions, BatchNorm) add the Gram of their own per-sample gradients. ``None``
    (decided while tracing, from shapes) unless the model has Dense layers, each called once on
    a [N, features] input."""
    layers = []

    def forward(eps):
        acts = []

        def intercept(next_fun, args, kwargs, context):
            if not (isinstance(context.module, nn.Dense) and context.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            out = next_fun(*args, **kwargs)
            acts.append(args[0])
            if eps is None:
                layers.append((context.module.scope.path, args[0].shape, out.shape,
                               context.module.use_bias, out.dtype))
                return out
            return out + eps[len(acts) - 1]

        with nn.intercept_methods(intercept):
            logits, _, _ = model.apply(net.params, net.model_state, x, False)
        return logits, acts

    jax.eval_shape(lambda: forward(None)[0])
    n = x.shape[0]
    if (not layers or len({path for path, *_ in layers}) != len(layers)
            or any(len(a) != 2 or a[0] != n for _, a, *_ in layers)):
        return None
    dense_paths = [path for path, *_ in layers]

    def summed_loss(eps):  # the sum of the rows' losses: its output gradients are per row
        logits, acts = forward(eps)
        return cross_entropy(logits, y) * n, acts

    eps = [jnp.zeros(out, dtype) for _, _, out, _, dtype in layers]  # the outputs' dtype
    deltas, acts = jax.grad(summed_loss, has_aux=True)(eps)
    gram = jnp.zeros((n, n), jnp.float32)
    for a, d, (_, _, _, bias, _) in zip(acts, deltas, layers, strict=True):
        a, d = a.astype(jnp.float32), d.astype(jnp.float32)
        gram = gram + (a @ a.T + (1.0 if bias else 0.0)) * (d @ d.T)
    rest = rest_grads(model, net, x, y, dense_paths)
    if rest is not None:
        gram = gram + rest @ rest.T
    return gram


def rest_grads(model: Model, net: NetState, x: Array, y: Array, dense_paths) -> Array | None:
    """Per-sample gradients [N, P'] (evaluation mode, raveled) of the parameters outside the
    modules at ``dense_paths`` (scope paths, e.g. ``('Dense_0',)``); None when there are none."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(net.params)
    params = [leaf for _, leaf in leaves]
    names = [tuple(getattr(k, "key", k) for k in path) for path, _ in leaves]
    rest = [i for i, name in enumerate(names)
            if not any(name[:len(p)] == tuple(p) for p in dense_paths)]
    if not rest:
        return None

    def one(xi, yi):
        def loss(chosen):
            full = list(params)
            for i, leaf in zip(rest, chosen, strict=True):
                full[i] = leaf
            tree = jax.tree_util.tree_unflatten(treedef, full)
            logits, _, _ = model.apply(tree, net.model_state, xi[None], False)
            return cross_entropy(logits, yi[None])

        return ravel_pytree(jax.grad(loss)([params[i] for i in rest]))[0]

    return jax.vmap(one)(x, y).astype(jnp.float32)


def select(key, n_seen, scores: Array, c: Array, valid: Array) -> tuple[Array, Array, Array]:
    """Algorithm 2's decisions for samples with scores ``c`` [B], in order.

    Returns ``(slot [B] int32, scores, n_seen)``: the memory row each sample is written to, or
    ``cap`` (rejected); a row chosen twice in the batch is kept only by its last sample.
    """
    cap, B = scores.shape[0], c.shape[0]

    def body(carry, inp):
        n, scores = carry
        ci, vi, ki = inp
        k_slot, k_keep = jax.random.split(ki)
        full = n >= cap
        logp = jnp.where(scores > 0, jnp.log(jnp.where(scores > 0, scores, 1.0)), -jnp.inf)
        i = jax.random.categorical(k_slot, logp)
        si = scores[i]
        accept = (ci < 1.0) & (jax.random.uniform(k_keep) * (si + ci) < si)
        slot = jnp.where(full, jnp.where(accept, i, cap), n)
        slot = jnp.where(vi, slot, cap)
        return (n + vi.astype(n.dtype), scores.at[slot].set(ci, mode="drop")), slot

    (n_seen, scores), slot = jax.lax.scan(body, (n_seen, scores),
                                          (c, valid, jax.random.split(key, B)))
    b = jnp.arange(B)
    later = (slot[:, None] == slot[None, :]) & (b[None, :] > b[:, None])
    return jnp.where(later.any(axis=1), cap, slot), scores, n_seen


def flush(model: Model, cfg: Config, state: State, key, when=True) -> State:
    """Score the pending batch against ``candidates`` memory rows with the current parameters
    and write the rows Algorithm 2 accepts (if ``when``; a traced bool is fine)."""
    write = state.pending_valid & when
    k_cand, k_select = jax.random.split(key)
    buffer, net = state.buffer, state.net

    def score(_):
        idx, mask = reservoir.sample_indices(k_cand, reservoir.size(buffer), cfg.candidates)
        cand = jax.tree.map(lambda a: a[idx], buffer.data)
        B = state.pending["y"].shape[0]
        rows = jax.tree.map(lambda p, c: jnp.concatenate([p, c]), state.pending, cand)
        gram = dense_gram(model, net, rows["x"], rows["y"])
        if gram is None:
            G = per_sample_grads(model, net, cand["x"], cand["y"])
            g = per_sample_grads(model, net, state.pending["x"], state.pending["y"])
            return gss_scores(g, G, mask)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        return scores_from_products(gram[:B, B:], norms[:B], norms[B:], mask)

    # skip the gradients on repeat passes (``when`` is shared by all members of a run)
    c = jax.lax.cond(jnp.any(when), score, lambda _: jnp.zeros(write.shape, jnp.float32), None)
    slot, scores, n_seen = select(k_select, buffer.n_seen, state.scores, c, write)
    data = jax.tree.map(lambda buf, new: buf.at[slot].set(new, mode="drop"), buffer.data,
                        state.pending)
    return state._replace(buffer=reservoir.ReservoirState(data, n_seen), scores=scores,
                          pending_valid=state.pending_valid & ~write)


def update_state(model: Model, cfg: Config, state: State, batch: Batch, hp, key):
    """One GSS step: select the pending batch into the memory, then an ER step."""
    k_write, k_read = jax.random.split(key)
    state = flush(model, cfg, state, k_write, batch.fresh)
    stream = {"x": batch.x, "y": batch.y}
    replay, replay_mask = er.replay_rows(state.buffer, k_read, cfg.replay_batch, stream)
    x = jnp.concatenate([batch.x, replay["x"]])
    y = jnp.concatenate([batch.y, replay["y"]])
    mask = jnp.concatenate([jnp.ones_like(batch.y, bool), replay_mask])
    net, loss, logits = cross_entropy_step(model, cfg.optimizer, state.net, x, y, mask, hp.lr)
    state = er.hold(state._replace(net=net), stream, batch.fresh)
    return state, {"loss": loss,
                   "stream_logits": online_logits(net, logits[:batch.y.shape[0]])}


def make(model: Model, cfg: Config | None = None) -> Learner:
    """GSS-Greedy learner for ``model`` with a memory of ``cfg.buffer_size`` rows."""
    cfg = cfg or Config()
    check_config(cfg)

    def init(key, x, hp: HParams) -> State:
        example = {"x": x, "y": jnp.zeros((x.shape[0],), jnp.int32)}
        return State(
            net=init_net(model, cfg.optimizer, key, x, hp.lr),
            buffer=reservoir.init(cfg.buffer_size, example),
            scores=jnp.zeros((cfg.buffer_size,), jnp.float32),
            pending=jax.tree.map(jnp.zeros_like, example),
            pending_valid=jnp.zeros((x.shape[0],), bool),
        )

    return net_learner(model, init, partial(update_state, model, cfg), HParams())
