"""Online EWC with the running Fisher of EWC++.

Schwarz et al. 2018, "Progress & Compress: A scalable framework for continual learning"
(ICML 2018), Sec. 3 ("online EWC"): instead of one quadratic penalty per past task, keep a
single consolidated diagonal Fisher ``F* <- gamma F* + F_task`` and one anchor ``theta*`` (the
parameters at the end of the last task), and train on

    loss = CE(batch) + (lam / 2) sum_i F*_i (theta_i - theta*_i)^2.

The Fisher of the task that just ended is the running estimate of EWC++ (Chaudhry et al.
2018, "Riemannian Walk for Incremental Learning: Understanding Forgetting and Intransigence",
ECCV 2018, Sec. 4.1): after every update

    F_t = alpha F_new + (1 - alpha) F_{t-1},   F_0 = 0,

so it is always current and no extra pass over the task's data is needed at the boundary.
``F_new`` is the empirical Fisher of the incoming mini-batch, by default (``fisher="batch"``)
the element-wise square of the gradient of the batch's mean cross-entropy at the pre-update
parameters: the estimate the RWalk authors' released code uses (``create_fisher_ops`` in
facebookresearch/agem squares the mini-batch gradient of the mean loss) and the survey's EWC++
(Mai et al. 2022) too; it comes free with the training gradient. ``fisher="per_sample"`` uses
the mean of per-sample squared gradients, the definition of the empirical Fisher (RWalk
Sec. 3.1; EWC), at about ``B`` times the backward cost: the batch version underestimates it
(roughly by a factor of the batch size where gradient noise dominates), so ``lam`` must be
re-tuned when switching. Only the cross-entropy's gradient enters the Fisher, not the penalty's.

At each task boundary (the first step of a new task, before its first update) the running
Fisher is consolidated, ``F* <- gamma F* + F_t``, and the anchor is reset to the current
parameters. Between boundaries both stay fixed; the running Fisher keeps moving (it is never
reset, as in EWC++). Before the first consolidation ``F* = 0``: plain finetuning.

Deviations, and why:

* Progress & Compress writes the penalty with ``gamma F*`` (the decayed Fisher); here the
  penalty uses ``F*`` itself (as Mammoth's ``ewc_on``), which differs by the constant factor
  ``gamma``, absorbed into ``lam``. There is no "compress" phase or active column: this is the
  online-EWC regulariser alone, applied to the one network.
* The EMA is applied every step (the paper's rule); the authors' code applies it every ``k``
  steps to the average of ``k`` squared gradients: ``alpha ~ 1 / k`` gives a similar window.
* EWC++'s Fisher is not min-max normalised here (the survey's code normalises it; RWalk's
  Eq. for EWC++ does not).

Task-free variant: ``Config.anchor_every = N > 0`` ignores the stream's boundaries and
consolidates / re-anchors every ``N`` updates (at update 0, N, 2N, ...; at update 0 the running
Fisher is still zero). Use ``gamma < 1`` there, or ``F*`` grows with every consolidation.

Recommended settings (Split MNIST, MLP 784-256-256-10, batch 10, one pass): SGD lr 0.1,
``lam = 100`` (strength), ``gamma = 1`` (Mammoth's seq-mnist setting), ``alpha = 0.01`` (a
window of about 100 steps); ``--no-task-free``, or ``--set anchor_every=1000`` on a task-free
stream. Like every parameter regulariser without replay it barely beats finetune in the
class-incremental setting (Mai et al. 2022; van de Ven et al. 2019).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ocljax import optim
from ocljax.errors import ConfigError, unknown_choice
from ocljax.learners.supervised import (
    NetState,
    apply_gradients,
    init_net,
    net_learner,
    online_logits,
)
from ocljax.types import Array, Batch, Learner, Model, PyTree

TASK_FREE_HINT = "consolidate on a schedule with --set anchor_every=N (steps)"
FISHER_MODES = ("batch", "per_sample")


@dataclass(frozen=True)
class Config:
    anchor_every: int = 0  # 0: consolidate at task boundaries; N > 0: every N updates
    fisher: str = "batch"  # "batch": squared mini-batch gradient; "per_sample": mean g_i^2
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.1
    lam: float = 100.0  # EWC strength: penalty (lam / 2) sum F* (theta - theta*)^2
    gamma: float = 1.0  # decay of the consolidated Fisher, F* <- gamma F* + F
    alpha: float = 0.01  # EMA weight of the newest batch in the running Fisher


class State(NamedTuple):
    net: NetState
    fisher: PyTree  # running (EMA) Fisher, shaped like the parameters
    consolidated: PyTree  # F*, updated only at consolidations
    anchor: PyTree  # theta*, updated only at consolidations
    step: Array  # [] int32, updates done


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible settings."""
    if cfg.anchor_every < 0:
        raise ConfigError(
            f"anchor_every must be >= 0 (0 = at task boundaries), got {cfg.anchor_every}"
        )
    if cfg.fisher not in FISHER_MODES:
        raise ConfigError(unknown_choice("fisher", cfg.fisher, FISHER_MODES))
    optim.check(cfg.optimizer)


def requires_boundaries(cfg: Config) -> bool:
    """Consolidating at task boundaries needs them; a fixed schedule does not."""
    return cfg.anchor_every == 0


def penalty(params: PyTree, anchor: PyTree, fisher: PyTree, lam) -> Array:
    """``(lam / 2) sum_i fisher_i (params_i - anchor_i)^2``; its gradient in ``params`` is
    ``lam * fisher * (params - anchor)``."""
    terms = jax.tree.map(lambda p, a, f: (f * jnp.square(p - a)).sum(), params, anchor, fisher)
    return 0.5 * lam * sum(jax.tree.leaves(terms))


def make(model: Model, cfg: Config | None = None) -> Learner:
    """Online-EWC learner for ``model`` with an EWC++ running Fisher."""
    cfg = cfg or Config()
    check_config(cfg)

    def ce_and_fisher(params, model_state, x, y):
        """Mean cross-entropy, its gradient, this batch's Fisher estimate, logits, BN state."""
        def rows(p):
            logits, _, new_state = model.apply(p, model_state, x, True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y), (logits, new_state)

        if cfg.fisher == "batch":
            def mean_loss(p):
                per_row, aux = rows(p)
                return per_row.mean(), aux

            (loss, (logits, new_state)), grads = jax.value_and_grad(mean_loss, has_aux=True)(
                params)
            fisher = jax.tree.map(jnp.square, grads)
        else:  # per-sample gradients of each row's loss (through BatchNorm's batch statistics)
            jac, (logits, new_state) = jax.jacrev(rows, has_aux=True)(params)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            grads = jax.tree.map(lambda j: j.mean(0), jac)
            fisher = jax.tree.map(lambda j: jnp.square(j).mean(0), jac)
        return loss, grads, fisher, logits, new_state

    def init(key, x, hp: HParams) -> State:
        net = init_net(model, cfg.optimizer, key, x, hp.lr)
        zeros = jax.tree.map(jnp.zeros_like, net.params)
        return State(net, zeros, zeros, net.params, jnp.zeros((), jnp.int32))

    def update(state: State, batch: Batch, hp: HParams, key):
        del key
        every = cfg.anchor_every
        now = batch.boundary if every == 0 else state.step % every == 0
        params = state.net.params
        consolidated = jax.tree.map(
            lambda c, f: jnp.where(now, hp.gamma * c + f, c), state.consolidated, state.fisher)
        anchor = jax.tree.map(lambda p, a: jnp.where(now, p, a), params, state.anchor)

        ce, ce_grads, f_new, logits, model_state = ce_and_fisher(
            params, state.net.model_state, batch.x, batch.y)
        pen, pen_grads = jax.value_and_grad(penalty)(params, anchor, consolidated, hp.lam)
        grads = jax.tree.map(jnp.add, ce_grads, pen_grads)
        net = apply_gradients(cfg.optimizer, state.net._replace(model_state=model_state),
                              grads, hp.lr)
        fisher = jax.tree.map(lambda f, g: hp.alpha * g + (1.0 - hp.alpha) * f,
                              state.fisher, f_new)
        new = State(net, fisher, consolidated, anchor, state.step + 1)
        return new, {"loss": ce + pen, "stream_logits": online_logits(net, logits)}

    return net_learner(model, init, update, HParams())
