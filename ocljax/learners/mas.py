"""Memory Aware Synapses (MAS), task-free: consolidate when the loss plateaus.

MAS: Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars 2018, "Memory Aware Synapses:
Learning what (not) to forget" (ECCV 2018), Sec. 4. A parameter's importance is how much the
squared L2 norm of the network's output moves when the parameter moves, averaged over samples
(Sec. 4.1, Eq. 2-4),

    Omega_ij = 1/N sum_k | d ||F(x_k; theta)||_2^2 / d theta_ij |,     F = the logits,

and training adds the penalty (Eq. 3)

    lam * sum_ij Omega_ij (theta_ij - theta*_ij)^2      (gradient 2 lam Omega (theta - theta*)),

with ``theta*`` the parameters at the last consolidation.

Task-free protocol: Aljundi, Kelchtermans & Tuytelaars 2019, "Task-Free Continual Learning"
(CVPR 2019), Sec. 3-4, as implemented in the authors' code (github.com/kkelchte/
task_free_continual_learning, ``method.py``; the brief's rahafaljundi repository is not
available here, and the paper text could not be consulted, so the code is the reference):

* **Hard buffer and replay.** Each step trains on the incoming batch plus the whole hard
  buffer, a small set of the ``hard_buffer_size`` hardest recent samples. After the step the hard
  buffer is rebuilt as the ``hard_buffer_size`` rows of (incoming batch + old hard buffer) with the
  highest loss, the losses being the pre-update per-row losses of the training forward pass.
* **When to consolidate.** The pre-update loss of each step (mean cross-entropy over the
  stream and hard rows, penalty excluded) is pushed into a window of the last ``window``
  losses (a ring buffer; while it holds fewer, its statistics are over the ones it has, as in
  the code). Consolidation fires when the window's mean is below ``mean_threshold``, its
  (population) variance below ``var_threshold``, and a new peak has been seen since the last
  consolidation: a peak is seen once the window's mean exceeds ``last_mean + sqrt(last_var)``,
  the statistics of the window at the last consolidation (the first plateau needs no peak).
  ``detect`` is this rule as a pure function.
* **What it uses and how it accumulates.** At a consolidation Omega is computed over the hard
  buffer (the rows just trained on) at the post-step parameters, folded into a cumulative
  moving average over consolidations, ``Omega <- Omega + (Omega_new - Omega) / n``, and
  ``theta*`` becomes the current parameters.

``Config.consolidate = "boundary"`` is the task-aware variant: consolidate (same Omega over the
hard buffer, same average) at the first fresh step of each new task, before its update;
it needs the stream's boundaries (``requires_boundaries``). Hard-buffer replay is the same.
This is the task-free method with its trigger replaced, not task-based MAS: the task-based
code (``rahafaljundi/MAS-Memory-Aware-Synapses``, ``accumelate_reg_params``) *adds* each task's
Omega, computed over the task's training data, where this variant *averages* Omegas computed
over the hard buffer, so old tasks' importance is diluted by 1/n instead of accumulating.

Deviations from the authors' code, and why:

* Omega uses the squared norm and the mean over samples (MAS Eq. 2-4); the task-free code
  differentiates the plain norm ``||F||_2`` and sums over the hard buffer. The two differ by a
  per-sample factor ``2 ||F(x)||`` and by ``hard_buffer_size``, absorbed into ``lam``.
* The penalty is MAS's ``lam sum Omega (theta - theta*)^2``; the code's is
  ``(MAS_weight / 2) sum ...`` (``lam = MAS_weight / 2``).
* Losses are means over rows (cross-entropy), the code's sums over rows (MSE on a toy task);
  the thresholds are therefore per-row losses.
* One update per incoming batch (the code takes ``gradient_steps`` updates on a
  ``recent_buffer`` of 20-30 samples); with ``passes > 1`` only fresh steps push a loss,
  may consolidate, and offer their rows to the hard buffer.
* Omega is computed with the model in evaluation mode (BatchNorm running statistics), one
  sample at a time (the code also takes one sample at a time).

Defaults: ``window = 5``, ``mean_threshold = 0.2``, ``var_threshold = 0.1``: the authors'
code (``loss_window_length``, ``loss_window_mean_threshold``,
``loss_window_variance_threshold``; the same in every experiment there). I found no MNIST
values: the paper's abstract reports face recognition and collision avoidance, the code runs
a synthetic two-task toy; so these are not MNIST-tuned. ``hard_buffer_size =
10`` (the code uses hard buffers of 5-30 next to a recent buffer of 20-30), SGD ``lr = 0.1``.
``lam = 0.1`` rather than MAS's usual 1: the penalty is a stiff quadratic under explicit SGD,
stable only while ``lr * 2 * lam * max(Omega) < 2``, and Omega of the output bias is the mean
``2 |logit|`` (up to about 20 on Split MNIST), so ``lam = 1`` diverged there at ``lr = 0.1``.

Measured (one seed, 2-core CPU, MLP 784-256-256-10, batch 10, ``hard_buffer_size = 10``):
Split MNIST (class-incremental, 2-class tasks) consolidates often, as each task's loss drops
below 0.2 within tens of steps, and ends at about 0.20 final accuracy for lam in 0.01-0.3,
no better than finetune: expected of a parameter regulariser there (van de Ven et al. 2019).
Permuted MNIST (1,000 samples per task) never reaches a window mean below 0.2, so nothing is
consolidated with the defaults; ``mean_threshold = 0.5`` with ``lam`` 0.1-0.3 gives about
+0.015 final accuracy over ``lam = 0`` (0.72 vs 0.705, 2 seeds).

Recommended: ``python -m experiments.split_mnist --learner mas`` (the hard buffer has its own
field name so presets' ER ``buffer_size`` does not resize it); sweep
``--grid mean_threshold=...`` per stream, since the loss scale is the stream's.

The very first step (hard buffer still empty) neither pushes its loss nor consolidates; a
boundary there is skipped too (there is nothing to compute Omega over).

Cost per step: a forward/backward on ``B + hard_buffer_size`` rows, plus ``hard_buffer_size``
per-sample gradients for Omega. Those sit in a ``lax.cond``, which ``vmap`` over members turns
into a select, so with the driver they are computed every step: keep ``hard_buffer_size`` small.
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
    gradient_step,
    init_net,
    net_learner,
    online_logits,
)
from ocljax.losses import masked_mean
from ocljax.types import Array, Batch, Learner, Model, PyTree

CONSOLIDATE_MODES = ("plateau", "boundary")
TASK_FREE_HINT = "use the default --set consolidate=plateau (loss-plateau detection)"


@dataclass(frozen=True)
class Config:
    hard_buffer_size: int = 10  # hard buffer: hardest recent rows, replayed every step
    window: int = 5  # loss window length for plateau detection
    consolidate: str = "plateau"  # "plateau" (task-free) | "boundary" (at task boundaries)
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.1
    lam: float = 0.1  # penalty lam * sum Omega (theta - theta*)^2
    mean_threshold: float = 0.2  # plateau: window mean below this ...
    var_threshold: float = 0.1  # ... and window variance below this


class Detector(NamedTuple):
    """Plateau detector state: a ring buffer of the last ``window`` losses."""

    window: Array  # [W] float32
    pos: Array  # [] int32, next slot to write
    filled: Array  # [] int32, slots holding a loss (<= W)
    peak: Array  # [] bool, a new peak was seen since the last consolidation
    last_mean: Array  # [] float32, window mean at the last consolidation
    last_var: Array  # [] float32, window variance at the last consolidation


class State(NamedTuple):
    net: NetState
    omega: PyTree  # importance, shaped like the parameters
    anchor: PyTree  # theta*, the parameters at the last consolidation
    n_consolidations: Array  # [] int32
    hard: dict  # {"x": [K, ...], "y": [K]}
    hard_valid: Array  # [K] bool
    detector: Detector


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible settings."""
    if cfg.hard_buffer_size < 1:
        raise ConfigError(f"hard_buffer_size must be >= 1, got {cfg.hard_buffer_size}")
    if cfg.window < 1:
        raise ConfigError(f"window (loss window length) must be >= 1, got {cfg.window}")
    if cfg.consolidate not in CONSOLIDATE_MODES:
        raise ConfigError(unknown_choice("consolidate", cfg.consolidate, CONSOLIDATE_MODES))
    optim.check(cfg.optimizer)


def requires_boundaries(cfg: Config) -> bool:
    """Consolidating at task boundaries needs them; plateau detection does not."""
    return cfg.consolidate == "boundary"


def init_detector(window: int) -> Detector:
    """An empty window; the first plateau needs no peak."""
    return Detector(
        window=jnp.zeros((window,), jnp.float32),
        pos=jnp.zeros((), jnp.int32),
        filled=jnp.zeros((), jnp.int32),
        peak=jnp.ones((), bool),
        last_mean=jnp.zeros((), jnp.float32),
        last_var=jnp.zeros((), jnp.float32),
    )


def window_stats(det: Detector) -> tuple[Array, Array]:
    """Mean and population variance of the losses in the window (0, 0 when empty)."""
    valid = jnp.arange(det.window.shape[0]) < det.filled
    n = jnp.maximum(det.filled, 1).astype(jnp.float32)
    mean = jnp.where(valid, det.window, 0.0).sum() / n
    var = jnp.where(valid, jnp.square(det.window - mean), 0.0).sum() / n
    return mean, var


def detect(det: Detector, loss, mean_threshold, var_threshold, enabled=True):
    """Push ``loss`` into the window and apply the task-free plateau rule.

    Returns ``(new_detector, fire)``. ``fire`` is True when the window's mean is below
    ``mean_threshold``, its variance below ``var_threshold``, and a peak has been seen since the
    last firing (a window mean above ``last_mean + sqrt(last_var)``). When ``enabled`` is False
    (a traced bool is fine) nothing is pushed and nothing fires.
    """
    enabled = jnp.asarray(enabled, bool)
    W = det.window.shape[0]
    pushed = Detector(
        window=det.window.at[det.pos].set(jnp.asarray(loss, jnp.float32)),
        pos=(det.pos + 1) % W,
        filled=jnp.minimum(det.filled + 1, W),
        peak=det.peak, last_mean=det.last_mean, last_var=det.last_var,
    )
    det = jax.tree.map(lambda new, old: jnp.where(enabled, new, old), pushed, det)
    mean, var = window_stats(det)
    peak = det.peak | (enabled & (mean > det.last_mean + jnp.sqrt(det.last_var)))
    fire = enabled & peak & (mean < mean_threshold) & (var < var_threshold)
    return det._replace(
        peak=peak & ~fire,
        last_mean=jnp.where(fire, mean, det.last_mean),
        last_var=jnp.where(fire, var, det.last_var),
    ), fire


def importance(model: Model, net: NetState, x: Array, mask: Array) -> PyTree:
    """MAS importance: mean over rows where ``mask`` [N] of ``|d ||logits(x_k)||^2 / d theta|``,
    one sample at a time, in evaluation mode. Zeros when no row is valid."""

    def sq_norm(params, xk):
        logits, _, _ = model.apply(params, net.model_state, xk[None], False)
        return jnp.sum(jnp.square(logits))

    grads = jax.vmap(jax.grad(sq_norm), in_axes=(None, 0))(net.params, x)
    w = mask.astype(jnp.float32) / jnp.maximum(mask.sum(), 1).astype(jnp.float32)
    return jax.tree.map(lambda g: jnp.tensordot(w, jnp.abs(g), axes=1), grads)


def penalty(params: PyTree, anchor: PyTree, omega: PyTree) -> Array:
    """``sum_ij omega_ij (params_ij - anchor_ij)^2`` (MAS Eq. 3 without ``lam``)."""
    terms = jax.tree.map(lambda p, a, o: (o * jnp.square(p - a)).sum(), params, anchor, omega)
    return sum(jax.tree.leaves(terms))


def consolidate(model: Model, state: State, when) -> State:
    """If ``when`` (traced bool): Omega <- running mean of Omega over consolidations, with the
    new term computed over the hard buffer at the current parameters; theta* <- parameters."""

    def fire(net, hard_x, hard_valid, omega, n):
        new = importance(model, net, hard_x, hard_valid)
        n = n + 1
        inv = 1.0 / n.astype(jnp.float32)
        omega = jax.tree.map(lambda o, g: o + (g - o) * inv, omega, new)
        return omega, net.params, n

    def keep(net, hard_x, hard_valid, omega, n):
        del net, hard_x, hard_valid
        return omega, state.anchor, n

    omega, anchor, n = jax.lax.cond(when, fire, keep, state.net, state.hard["x"],
                                    state.hard_valid, state.omega, state.n_consolidations)
    return state._replace(omega=omega, anchor=anchor, n_consolidations=n)


def hard_rows(state: State, stream: dict) -> dict:
    """The hard buffer's rows; empty slots hold stream rows (masked out of every loss, but they
    keep BatchNorm's batch statistics those of real data)."""
    K = state.hard_valid.shape[0]
    B = stream["y"].shape[0]
    filler = jax.tree.map(lambda a: a[jnp.arange(K) % B], stream)
    pick = lambda h, f: jnp.where(  # noqa: E731
        state.hard_valid.reshape(-1, *([1] * (h.ndim - 1))), h, f)
    return jax.tree.map(pick, state.hard, filler)


def init_state(model: Model, cfg: Config, key, x, hp) -> State:
    """Fresh network, Omega = 0, theta* = initial parameters, empty hard buffer and window."""
    net = init_net(model, cfg.optimizer, key, x, hp.lr)
    K = cfg.hard_buffer_size
    return State(
        net=net,
        omega=jax.tree.map(jnp.zeros_like, net.params),
        anchor=net.params,
        n_consolidations=jnp.zeros((), jnp.int32),
        hard={"x": jnp.zeros((K, *x.shape[1:]), x.dtype), "y": jnp.zeros((K,), jnp.int32)},
        hard_valid=jnp.zeros((K,), bool),
        detector=init_detector(cfg.window),
    )


def update_state(model: Model, cfg: Config, state: State, batch: Batch, hp):
    """One step: (boundary mode: consolidate), train on stream + hard buffer, (plateau mode:
    push the loss, consolidate on a plateau), rebuild the hard buffer."""
    fresh = jnp.asarray(batch.fresh, bool)
    has_hard = state.hard_valid.any()  # False only before the first update
    if cfg.consolidate == "boundary":
        state = consolidate(model, state, batch.boundary & fresh & has_hard)
    B = batch.y.shape[0]
    stream = {"x": batch.x, "y": batch.y}
    hard = hard_rows(state, stream)
    x = jnp.concatenate([batch.x, hard["x"]])
    y = jnp.concatenate([batch.y, hard["y"]])
    mask = jnp.concatenate([jnp.ones((B,), bool), state.hard_valid])

    def loss_fn(params, model_state):
        logits, _, model_state = model.apply(params, model_state, x, True)
        per_row = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        ce = masked_mean(per_row, mask)
        total = ce + hp.lam * penalty(params, state.anchor, state.omega)
        return total, ((logits, per_row, ce), model_state)

    net, _, (logits, per_row, ce) = gradient_step(cfg.optimizer, state.net, loss_fn, hp.lr)
    old = state
    state = state._replace(net=net)
    fired = jnp.asarray(batch.boundary & fresh & has_hard, bool)
    if cfg.consolidate == "plateau":
        det, fired = detect(state.detector, ce, hp.mean_threshold, hp.var_threshold,
                            fresh & has_hard)
        state = consolidate(model, state._replace(detector=det), fired)

    # Hardest rows of (fresh stream rows + hard buffer), by their pre-update loss.
    K = cfg.hard_buffer_size
    offered = jnp.concatenate([jnp.broadcast_to(fresh, (B,)), old.hard_valid])
    scores = jnp.where(offered, per_row, -jnp.inf)
    top, idx = jax.lax.top_k(scores, K)
    state = state._replace(
        hard={"x": x[idx], "y": y[idx]},
        hard_valid=top > -jnp.inf,
    )
    return state, {"loss": ce, "stream_logits": online_logits(net, logits[:B]),
                   "consolidated": fired}


def make(model: Model, cfg: Config | None = None) -> Learner:
    """MAS learner for ``model``: hard-buffer replay plus the MAS penalty, consolidated on loss
    plateaus (``consolidate="plateau"``) or at task boundaries (``"boundary"``)."""
    cfg = cfg or Config()
    check_config(cfg)

    def init(key, x, hp: HParams) -> State:
        return init_state(model, cfg, key, x, hp)

    def update(state: State, batch: Batch, hp: HParams, key):
        del key
        return update_state(model, cfg, state, batch, hp)

    return net_learner(model, init, update, HParams())
