"""DVC: dual view consistency, with replay chosen by gradient-magnitude increase (MGI).

Gu, Yang, Wei & Deng 2022, "Not Just Selection, but Exploration: Online Class-Incremental
Continual Learning via Dual View Consistency" (CVPR 2022); authors' code ``YananGu/DVC``
(``agents/exp_replay_dvc.py``, ``loss.py``, ``models/resnet.py``,
``utils/buffer/mgi_retrieve.py``), built on Mai et al.'s online-continual-learning code. The
paper's point: a replay learner sees each incoming image once, so it should extract more from it
by asking two views of it to agree. Each step, with the incoming batch ``(x, y)``:

1. **Two views.** ``x`` and an augmented view ``x~`` (``augment``: the code's resized crop, area
   0.2-1, flip, colour jitter and grayscale) go through the network in one pass, giving logits
   ``z`` and ``z~``. A small head Q (Linear 2C -> 128, ReLU, Linear 128 -> C) maps the pair of
   logit vectors to a third prediction ``q = Q([z, z~])``.
2. **Loss** (``dvc_loss``, the code's ``agmax_loss`` plus cross-entropy), with ``P = softmax``:
   cross-entropy on both views; plus the negative entropy of the batch-marginal prediction of
   each of ``P(z), P(z~), P(q)``, averaged over the three (each view spreads its predictions
   over the classes); plus ``dl_weight`` times the mean absolute difference between ``P(q)``
   and each view's ``P`` (the dual views agree through Q).
3. **MGI retrieval** (``mgi_scores``): from ``candidates`` (50) memory rows, each with a fresh
   augmented view, score every row by how much a virtual SGD step on the incoming loss
   (``theta - lr grad``) raises the size of its last-layer cross-entropy gradient,
   ``|softmax(z) - onehot(y)|_1 * |h|_1`` (``h`` the penultimate features of the raw view),
   and keep the ``replay_batch`` (10) highest.
4. One optimizer step on the incoming loss plus the same loss on the retrieved rows (two
   means, summed: the code back-propagates them separately before one step). The incoming
   batch then enters the reservoir (deferred here to the next step, as in ER).

Prediction is ``z``, the network's logits on the raw image; Q is used only in training.

Defaults: the code's (``general_main.py``, README commands): SGD lr 0.1, batch 10, 10 replayed
rows out of 50 candidates, reservoir memory; ``dl_weight`` 2.0, its CIFAR-10 value (4.0 on
CIFAR-100 and mini-ImageNet), for the 10-class benchmarks here.

Deviations:

- Augmentations are drawn per image. The code runs torchvision transforms on the whole batch
  tensor, which draws one crop, one flip, one jitter and one grayscale coin for all the images
  of a call; we read that as an artefact of batching. Colour jitter here is brightness and
  contrast (``jitter40``), without the code's saturation and hue (no-ops on grey images).
- The incoming and memory rows each go through their own forward passes, as in the code; the
  MGI scoring pass runs in training mode and its BatchNorm statistics are kept, as the code's
  live-model pass does; the virtual model's are discarded.
- Candidates the memory does not hold yet are copies of incoming rows scoring ``-inf``
  (``er.replay_rows``); while the memory holds fewer than ``replay_batch`` rows, the retrieved
  rows that do not exist are masked out of the loss (the code's memory batch is shorter).
- The marginals are clamped below at ``EPS`` (the code clamps at float64's epsilon, in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax import augment as aug
from ocljax.errors import ConfigError
from ocljax.learners import er
from ocljax.learners.supervised import NetState, apply_gradients, classifier_learner, online_logits
from ocljax.losses import cross_entropy, masked_mean
from ocljax.optim import build as build_optimizer
from ocljax.types import Array, Batch, Learner, Model, PyTree

__all__ = ["Config", "EPS", "HParams", "State", "check_config", "dvc_loss", "init_q", "make",
           "mgi_scores", "q_head"]

EPS = 2.220446049250313e-16  # the code's np.finfo(float).eps
Q_HIDDEN = 128


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_batch: int = 10  # the code's eps_mem_batch: rows replayed per step
    candidates: int = 50  # the code's subsample: memory rows scored per step
    augment: str = "rrc20,flip,jitter40,gray20"  # the second view (ocljax.augment spec)
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.1
    dl_weight: float = 2.0  # weight of the view-agreement term (the code's CIFAR-10 value)


State = er.State  # net params = {"net": model params, "q": Q head params}


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes or unknown choices."""
    er.check_config(cfg)
    if not cfg.replay_batch <= cfg.candidates <= cfg.buffer_size:
        raise ConfigError(
            f"DVC retrieves replay_batch={cfg.replay_batch} of candidates={cfg.candidates} "
            f"rows drawn from a buffer of {cfg.buffer_size}: need replay_batch <= candidates "
            f"<= buffer_size")
    aug.parse(cfg.augment)


def init_q(key: Array, num_classes: int) -> PyTree:
    """Q's parameters with PyTorch's ``nn.Linear`` initialisation (uniform in +-1/sqrt(fan_in))."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    u = lambda k, shape, fan: jax.random.uniform(  # noqa: E731
        k, shape, jnp.float32, -1.0 / jnp.sqrt(fan), 1.0 / jnp.sqrt(fan))
    c2 = 2 * num_classes
    return {"w1": u(k1, (c2, Q_HIDDEN), c2), "b1": u(k2, (Q_HIDDEN,), c2),
            "w2": u(k3, (Q_HIDDEN, num_classes), Q_HIDDEN),
            "b2": u(k4, (num_classes,), Q_HIDDEN)}


def q_head(q: PyTree, z: Array, zt: Array) -> Array:
    """Q's prediction [N, C] from the two views' logits [N, C] each."""
    hidden = jax.nn.relu(jnp.concatenate([z, zt], -1) @ q["w1"] + q["b1"])
    return hidden @ q["w2"] + q["b2"]


def _neg_marginal_entropy(p: Array, valid: Array) -> Array:
    """``sum_c m_c log m_c`` of the batch-marginal prediction ``m`` over the valid rows."""
    col = jnp.where(valid[:, None], p, 0.0).sum(0)
    m = jnp.maximum(col / jnp.maximum(col.sum(), EPS), EPS)
    return (m * jnp.log(m)).sum()


def dvc_loss(z: Array, zt: Array, q: Array, y: Array, valid: Array, dl_weight) -> Array:
    """DVC's loss on one set of rows (module docstring, step 2): cross-entropy on both views'
    logits ``z``, ``zt`` [N, C], the mean over ``P(z), P(zt), P(q)`` of their batch-marginal
    negative entropies, and ``dl_weight`` times the mean absolute difference of ``P(q)`` from
    each view's ``P``; over the rows where ``valid`` [N] (0 when there is none)."""
    both = jnp.concatenate([valid, valid])
    ce = cross_entropy(jnp.concatenate([z, zt]), jnp.concatenate([y, y]), both)
    pz, pzt, pq = (jax.nn.softmax(a, axis=-1) for a in (z, zt, q))
    agreement = sum(_neg_marginal_entropy(p, valid) for p in (pz, pzt, pq)) / 3.0
    dl = 0.5 * (masked_mean(jnp.abs(pq - pz).mean(-1), valid)
                + masked_mean(jnp.abs(pq - pzt).mean(-1), valid))
    return ce + jnp.where(valid.any(), agreement, 0.0) + dl_weight * dl


def mgi_scores(z_pre: Array, h_pre: Array, z_post: Array, h_post: Array, y: Array) -> Array:
    """Per-row growth [N] of the last layer's cross-entropy gradient size from the current to
    the virtually updated model: ``g = |softmax(z) - onehot(y)|_1 * |h|_1`` (the entrywise L1
    norm of that gradient for one row), ``g_post - g_pre`` (module docstring, step 3)."""
    def size(z, h):
        hot = jax.nn.one_hot(y, z.shape[-1])
        return jnp.abs(jax.nn.softmax(z, axis=-1) - hot).sum(-1) * jnp.abs(h).sum(-1)

    return size(z_post, h_post) - size(z_pre, h_pre)


def make(model: Model, cfg: Config | None = None) -> Learner:
    """DVC learner: two views agreeing through Q, MGI retrieval, reservoir memory."""
    cfg = cfg or Config()
    check_config(cfg)
    C = model.num_classes

    def forward(params, model_state, x, xt):
        """``(z, zt, q, h of x, model_state)``: both views in one training-mode pass."""
        logits, h, model_state = model.apply(params["net"], model_state,
                                             jnp.concatenate([x, xt]), True)
        n = x.shape[0]
        logits = logits.astype(jnp.float32)
        z, zt = logits[:n], logits[n:]
        return z, zt, q_head(params["q"], z, zt), h[:n].astype(jnp.float32), model_state

    def init(key, x, hp: HParams) -> State:
        params, model_state = model.init(key, x)
        params = {"net": params, "q": init_q(jax.random.fold_in(key, 1), C)}
        net = NetState(params, model_state, build_optimizer(cfg.optimizer, hp.lr).init(params))
        return er.state_around(cfg, net, x)

    def update(state: State, batch: Batch, hp: HParams, key):
        """Write the pending batch; incoming loss and gradient; MGI retrieval with the virtual
        step; the memory loss's gradient; one step on both."""
        k_write, k_read, k_view, k_mem_view = jax.random.split(key, 4)
        state = er.flush(state, k_write, batch.fresh)
        net = state.net
        stream = {"x": batch.x, "y": batch.y}
        n = batch.y.shape[0]
        xt = aug.augment(k_view, batch.x, cfg.augment)
        ones = jnp.ones((n,), bool)

        def incoming_loss(params):
            z, zt, q, _, ms = forward(params, net.model_state, batch.x, xt)
            return dvc_loss(z, zt, q, batch.y, ones, hp.dl_weight), (z, ms)

        (l_in, (z_in, ms)), g_in = jax.value_and_grad(incoming_loss, has_aux=True)(net.params)
        # MGI: candidates with a fresh view, scored before and after the virtual step
        cands, cand_mask = er.replay_rows(state.buffer, k_read, cfg.candidates, stream)
        cand_view = aug.augment(k_mem_view, cands["x"], cfg.augment)
        virtual = jax.tree.map(lambda p, g: p - hp.lr * g, net.params, g_in)
        z_pre, _, _, h_pre, ms_scored = forward(net.params, ms, cands["x"], cand_view)
        z_post, _, _, h_post, _ = forward(virtual, ms, cands["x"], cand_view)
        scores = jax.lax.stop_gradient(jnp.where(
            cand_mask, mgi_scores(z_pre, h_pre, z_post, h_post, cands["y"]), -jnp.inf))
        _, top = jax.lax.top_k(scores, cfg.replay_batch)
        mem_x, mem_view, mem_y = cands["x"][top], cand_view[top], cands["y"][top]
        mem_mask = cand_mask[top]
        any_mem = cand_mask.any()  # the code skips retrieval and replay on an empty memory
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(any_mem, a, b), new, old)
        ms = keep(ms_scored, ms)

        def memory_loss(params):
            z, zt, q, _, ms_mem = forward(params, ms, mem_x, mem_view)
            return dvc_loss(z, zt, q, mem_y, mem_mask, hp.dl_weight), ms_mem

        (l_mem, ms_mem), g_mem = jax.value_and_grad(memory_loss, has_aux=True)(net.params)
        grads = jax.tree.map(jnp.add, g_in, g_mem)
        net = apply_gradients(cfg.optimizer, net._replace(model_state=keep(ms_mem, ms)), grads,
                              hp.lr)
        state = er.hold(state._replace(net=net), stream, batch.fresh)
        return state, {"loss": l_in + l_mem, "stream_logits": online_logits(net, z_in)}

    return classifier_learner(model, init, update, HParams())
