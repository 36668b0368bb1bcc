"""Gradient Episodic Memory (GEM).

Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning" (NeurIPS 2017),
Sec. 3, Eq. 6-13, checked against the authors' code (``facebookresearch/GradientEpisodicMemory``,
``model/gem.py``: ``observe``, ``project2cone2``). An episodic memory keeps up to
``patterns_per_task`` rows of every task. Each step computes the gradient ``g_k`` of the
cross-entropy on the whole memory of every *completed* task k and the gradient ``g`` on the
incoming batch. If some ``g . g_k < 0`` (the step would increase a past task's memory loss,
Eq. 6-7), ``g`` is replaced by the closest vector (in L2) that has a non-negative inner product
with every ``g_k`` (Eq. 8-9). With G the [t, P] matrix of the ``g_k``, the dual (Eq. 10-11) is
the small quadratic program

    min_v  1/2 v' (G G' + eps I) v + (G g)' v   subject to  v >= gamma,       g~ = G' v + g

over t <= ``max_tasks`` variables. ``gamma`` (``memory_strength``, 0.5) is the paper's "small
constant added to v*" that biases the projection toward positive backward transfer, which the
code, like this module, implements as the bound ``v >= gamma``; ``eps`` 1e-3 is the code's
ridge on G G'. ``g~`` is applied with the configured optimizer (the code's plain SGD).

The QP is solved exactly, on the device, by Lawson & Hanson's active-set method
(``solve_dual``), the algorithm family of the code's ``quadprog``: its objective decreases
strictly, so it cannot cycle, and it ends after at most ``qp_iters`` entries into the free set
(static, so it runs inside ``lax.scan`` and ``vmap``). From the KKT conditions the projected
gradient has ``g_k . g~ = mu_k - r v_k`` with ``mu_k >= 0``: non-negative up to the ridge's
``r v_k``, which is what the tests check, on random and on nearly low-rank G.

Memory (the code's ``observe``): task k's rows live in region k (``patterns_per_task`` rows).
Each incoming batch is written into the current task's region from the position ``mem_cnt`` on,
as many rows as fit before the region's end (the rest of that batch is dropped); ``mem_cnt``
then wraps to 0 at the end, and it is *not* reset when a new task starts. Writes happen one
step late as in ``er`` (only completed tasks are read, so the delay changes nothing); the
region is closed at the next boundary (``agem.close_task``). Rows never written are masked out
of their task's loss (the code reads its uninitialised rows). Tasks beyond ``max_tasks`` are
not stored. GEM needs the stream's task boundaries.

Cost: every step back-propagates through ``max_tasks * patterns_per_task`` memory rows (the
regions of tasks not completed yet are masked, but have fixed shapes under ``vmap``). The
command line sets ``max_tasks`` to the stream's number of tasks minus one, unless it is set:
the last task's memory would never be read.

Deviations from the authors' code:

- The memory forwards use the model's state as it is and do not update BatchNorm statistics
  (the code's models have no BatchNorm).
- The code solves the QP with ``quadprog`` in float64 on the host; here it is solved on the
  device in float32. Float32 cannot resolve the code's ridge of 1e-3 against task gradients
  of norm in the hundreds, so the ridge is at least 1e-5 times the largest ``|g_k|^2``; a
  solve that still fails returns ``v = gamma`` (feasible) instead of NaN.
- Single-head: the code masks the outputs of other tasks only in its task-incremental CIFAR
  setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax import optim
from ocljax.errors import ConfigError, require_positive
from ocljax.learners import agem, er
from ocljax.learners.supervised import NetState, apply_gradients, net_learner, online_logits
from ocljax.losses import cross_entropy
from ocljax.memory import reservoir
from ocljax.types import Array, Batch, Learner, Model, PyTree

__all__ = ["Config", "HParams", "State", "TASK_FREE_HINT", "check_config", "fit_to_stream", "gram",
           "make", "project", "requires_boundaries", "solve_dual"]

TASK_FREE_HINT = "use agem (task-free reservoir memory) or er"


@dataclass(frozen=True)
class Config:
    patterns_per_task: int = 256  # rows kept per task (the paper's MNIST setting)
    max_tasks: int = 20  # tasks kept; set it to the stream's number of tasks
    memory_strength: float = 0.5  # gamma: lower bound of the dual variables
    eps: float = 1e-3  # ridge added to G G'
    qp_iters: int = 60  # most variables entering the dual solver's free set (>= 3 max_tasks)
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.1


class State(NamedTuple):
    net: NetState
    buffer: reservoir.ReservoirState  # data [max_tasks * P, ...]; n_seen: rows of this task
    n_tasks: Array  # [] int32, completed tasks (the current task's region index)
    task_rows: Array  # [max_tasks] int32, unused here (``agem.close_task`` keeps it; GEM
    # reads ``filled``, since the authors' writes do not fill a region from its start)
    ref_step: Array  # [] int32, unused here (``agem.close_task`` resets it)
    pending: dict  # {"x": [B, ...], "y": [B]}: last incoming batch, not yet written
    pending_valid: Array  # [B] bool
    mem_cnt: Array  # [] int32, the code's write position in a region (not reset per task)
    filled: Array  # [max_tasks * P] bool, memory rows that hold a row of their task


def requires_boundaries(cfg: Config) -> bool:
    """GEM's memory is per task: it always needs the task boundaries."""
    del cfg
    return True


def fit_to_stream(cfg: Config, stream_cfg, explicit: set[str]):
    """On the command line ``max_tasks`` defaults to the stream's number of tasks minus one
    (every step back-propagates through ``max_tasks`` memory regions, used or not, and no task
    follows the last one to read its memory); an explicit ``--set max_tasks=N`` is kept.
    Returns ``(cfg, note or None)``."""
    n = getattr(stream_cfg, "n_tasks", None)
    if "max_tasks" in explicit or n is None:
        return cfg, None
    n = max(n - 1, 1)
    if n == cfg.max_tasks:
        return cfg, None
    return dataclasses.replace(cfg, max_tasks=n), (
        f"gem: max_tasks {cfg.max_tasks} -> {n}, the stream's tasks but the last (whose "
        f"memory no later task reads)")


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes and solver settings."""
    require_positive(cfg, "patterns_per_task", "max_tasks")
    if cfg.memory_strength < 0:
        raise ConfigError(f"memory_strength must be >= 0, got {cfg.memory_strength}")
    if cfg.eps <= 0:
        raise ConfigError(f"eps must be > 0 (it keeps G G' invertible), got {cfg.eps}")
    require_positive(cfg, "qp_iters")
    optim.check(cfg.optimizer)


def gram(gs: PyTree, g: PyTree) -> tuple[Array, Array]:
    """``(G G' [t, t], G g [t])`` for task gradients ``gs`` (leaves [t, ...]) and the gradient
    ``g``, summed leaf by leaf (no raveled vector; see ``ocljax.tree_math``)."""
    flat = [(a.reshape(a.shape[0], -1), b.reshape(-1))
            for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(g), strict=True)]
    gg = sum(a @ a.T for a, _ in flat)
    gv = sum(a @ b for a, b in flat)
    return gg, gv


def solve_dual(gg: Array, gv: Array, active: Array, gamma, eps, iters: int) -> Array:
    """The dual of GEM's projection: ``argmin_v 1/2 v'(gg + r I)v + gv'v`` subject to
    ``v >= gamma`` on ``active`` [t] variables (the others are 0), with the ridge
    ``r = max(eps, 1e-5 * max diag(gg))``.

    Lawson & Hanson's active-set method (1974, "Solving Least Squares Problems", Ch. 23, the
    algorithm of quadprog's and scipy's exact solvers for this form) on ``w = v - gamma >= 0``:
    variables enter the free set one at a time by the largest descent, each entry followed by
    interpolation steps that drop variables hitting their bound. The objective decreases
    strictly, so no set repeats and it ends in at most ``iters`` entries (``3 t`` by default
    suffices in practice). Should the solve still produce a non-finite value (a singular
    system), ``v = gamma`` is returned for the active variables: a feasible point."""
    t = gv.shape[0]
    eye = jnp.eye(t, dtype=gg.dtype)
    both = active[:, None] & active[None, :]
    scale = jnp.max(jnp.where(active, jnp.diagonal(gg), 0.0))
    ridge = jnp.maximum(eps, 1e-5 * scale)  # float32 cannot resolve a smaller relative ridge
    p = jnp.where(both, gg + ridge * eye, 0.0)
    c = gv + p @ jnp.where(active, gamma, 0.0)  # gradient of the objective at w = 0
    tol = 1e-6 * (jnp.max(jnp.abs(c)) + 1e-30)

    def restricted(free):
        k = jnp.where(free[:, None] & free[None, :], p, 0.0) + jnp.where(free, 0.0, 1.0) * eye
        return jnp.where(free, jnp.linalg.solve(k, jnp.where(free, -c, 0.0)), 0.0)

    def inner_cond(carry):
        _, free, done, n = carry
        return ~done & (n <= t)

    def inner_body(carry):
        w, free, _, n = carry
        s = restricted(free)
        ok = jnp.all(jnp.where(free, s > 0, True))
        blocking = free & (s <= 0)
        ratio = jnp.where(blocking, w / jnp.where(blocking, w - s, 1.0), jnp.inf)
        alpha = jnp.clip(jnp.min(ratio), 0.0, 1.0)
        stepped = w + alpha * (s - w)
        w = jnp.where(ok, s, jnp.where(free, stepped, 0.0))
        free = jnp.where(ok, free, free & (w > 0))
        return jnp.maximum(w, 0.0), free, ok, n + 1

    def outer_cond(carry):
        w, free, n = carry
        descent = -(p @ w + c)
        return (n < iters) & jnp.any(active & ~free & (descent > tol))

    def outer_body(carry):
        w, free, n = carry
        descent = jnp.where(active & ~free, -(p @ w + c), -jnp.inf)
        free = free.at[jnp.argmax(descent)].set(True)
        w, free, _, _ = jax.lax.while_loop(inner_cond, inner_body, (w, free, False, 0))
        return w, free, n + 1

    w0 = jnp.zeros((t,), gg.dtype)
    w, _, _ = jax.lax.while_loop(outer_cond, outer_body, (w0, jnp.zeros((t,), bool), 0))
    v = jnp.where(active, w + gamma, 0.0)
    return jnp.where(jnp.all(jnp.isfinite(v)), v, jnp.where(active, gamma, 0.0))


def project(gs: PyTree, g: PyTree, active: Array, gamma, eps, iters: int) -> PyTree:
    """GEM's projected gradient: ``g`` unchanged unless ``g . g_k < 0`` for an ``active`` task
    k; then ``G' v + g`` with ``v`` from ``solve_dual``."""
    gg, gv = gram(gs, g)
    violated = (active & (gv < 0)).any()
    v = solve_dual(gg, gv, active, gamma, eps, iters)
    v = jnp.where(violated, v, 0.0)
    return jax.tree.map(lambda a, b: b + jnp.tensordot(v, a, axes=1).astype(b.dtype), gs, g)


def flush_memory(cfg: Config, state: State, when=True) -> State:
    """Write the pending rows into the current task's region as the authors' ``observe`` does:
    from ``mem_cnt`` on, as many as fit before the region's end (the rest of the batch is
    dropped), then ``mem_cnt`` wraps to 0 once it reaches the end; it is not reset when a task
    starts. Nothing is written once ``max_tasks`` tasks are stored."""
    P, cap = cfg.patterns_per_task, cfg.max_tasks * cfg.patterns_per_task
    write = state.pending_valid & when & (state.n_tasks < cfg.max_tasks)
    order = jnp.cumsum(write.astype(jnp.int32)) - 1  # j-th written row of the batch
    fits = write & (state.mem_cnt + order < P)
    row = jnp.where(fits, state.n_tasks * P + state.mem_cnt + order, cap)
    data = jax.tree.map(lambda buf, new: buf.at[row].set(new, mode="drop"),
                        state.buffer.data, state.pending)
    mem_cnt = state.mem_cnt + fits.sum(dtype=jnp.int32)
    offered = state.pending_valid & when
    buffer = reservoir.ReservoirState(data, state.buffer.n_seen + offered.sum(dtype=jnp.int32))
    return state._replace(buffer=buffer, pending_valid=state.pending_valid & ~offered,
                          mem_cnt=jnp.where(mem_cnt >= P, 0, mem_cnt),
                          filled=state.filled.at[row].set(True, mode="drop"))


def agem_config(cfg: Config) -> agem.Config:
    """A-GEM's per-task memory settings matching ``cfg``, for the pieces of ``agem`` that GEM
    shares (``init_state``, ``close_task``)."""
    return agem.Config(memory="per_task", patterns_per_task=cfg.patterns_per_task,
                       max_tasks=cfg.max_tasks, mem_batch=cfg.max_tasks,
                       optimizer=cfg.optimizer)


def update_state(model: Model, cfg: Config, state: State, batch: Batch, hp, key):
    """One GEM step: write the pending batch (closing a task at a boundary), the gradient of
    every completed task's memory and of the incoming batch, the projection, the step."""
    del key
    state = agem.close_task(agem_config(cfg), flush_memory(cfg, state, batch.fresh),
                            batch.boundary)
    net, P = state.net, cfg.patterns_per_task

    def loss_fn(params, x, y, mask):
        logits, _, model_state = model.apply(params, net.model_state, x, True)
        return cross_entropy(logits, y, mask), (logits, model_state)

    grad = jax.grad(lambda p, x, y, m: loss_fn(p, x, y, m)[0])
    memory = jax.tree.map(lambda a: a.reshape(cfg.max_tasks, P, *a.shape[1:]),
                          state.buffer.data)
    rows = state.filled.reshape(cfg.max_tasks, P)  # [T, P]: rows that hold data
    gs = jax.vmap(grad, in_axes=(None, 0, 0, 0))(net.params, memory["x"], memory["y"], rows)
    active = jnp.arange(cfg.max_tasks) < state.n_tasks
    (loss, (logits, model_state)), g = jax.value_and_grad(loss_fn, has_aux=True)(
        net.params, batch.x, batch.y, None)
    g = project(gs, g, active, cfg.memory_strength, cfg.eps, cfg.qp_iters)
    net = apply_gradients(cfg.optimizer, net._replace(model_state=model_state), g, hp.lr)
    state = er.hold(state._replace(net=net), {"x": batch.x, "y": batch.y}, batch.fresh)
    return state, {"loss": loss, "stream_logits": online_logits(net, logits)}


def make(model: Model, cfg: Config | None = None) -> Learner:
    """GEM learner for ``model``: per-task episodic memory, QP-projected gradients."""
    cfg = cfg or Config()
    check_config(cfg)

    def init(key, x, hp: HParams) -> State:
        base = agem.init_state(model, agem_config(cfg), key, x, hp)
        return State(**base._asdict(), mem_cnt=jnp.zeros((), jnp.int32),
                     filled=jnp.zeros((cfg.max_tasks * cfg.patterns_per_task,), bool))

    return net_learner(model, init, partial(update_state, model, cfg), HParams())
