"""In-graph evaluation of one member on a held-out pool: class-IL, task-aware and cumulative
accuracy per task, from one forward pass over the pool.

For a test sample of task ``j`` (as ``eval_tasks`` assigns it) and the learner's logits over
all ``C`` classes, with ``task(c)`` the task class ``c`` belongs to (``eval_tasks`` applied to
the class ids; -1 for classes no task uses):

* class-IL accuracy (``acc``): ``argmax_c logits == y`` over all classes;
* task-aware accuracy (``task_aware``, the task-IL protocol, e.g. van de Ven & Tolias 2019,
  "Three scenarios for continual learning", Sec. 2): the argmax over the classes of task ``j``
  only, as if the task id were given at test time;
* cumulative accuracy (``cumulative[k]``; Soutif-Cormerais et al. 2023, "A Comprehensive
  Empirical Evaluation on Online Continual Learning", Sec. 4, after Avalanche's
  ``CumulativeAccuracy``): accuracy on the union of the test sets of tasks ``0..k`` with the
  argmax restricted to the classes of tasks ``0..k`` - how well the first k+1 tasks are still
  told apart when the later tasks' outputs are left out. Weighted by samples, not by task.
  (Avalanche indexes the restricted logits by position, which is correct only when the
  classes of tasks ``0..k`` are ``0..n-1``; here the restriction keeps the real class ids.)

On permuted (domain-incremental) streams every class belongs to every task, so the three
coincide up to the task-vs-sample weighting. Ties go to the lowest class id, as ``argmax``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ocljax.types import Array, Learner


class EvalPool(NamedTuple):
    """A test subset cut into equal batches; padding rows have ``mask`` False."""

    x: Array  # [n_batches, eval_batch, ...]
    y: Array  # [n_batches, eval_batch] int32
    mask: Array  # [n_batches, eval_batch] bool


class Accuracies(NamedTuple):
    """One evaluation of one member; each leaf [T] float32 (see the module docstring)."""

    acc: Array  # class-IL accuracy on each task's test samples
    task_aware: Array  # accuracy with the argmax restricted to the sample's task's classes
    cumulative: Array  # [k]: accuracy on tasks 0..k with the argmax over their classes


def zeros(n_tasks: int) -> Accuracies:
    """An all-zero ``Accuracies`` (the no-evaluation branch)."""
    z = jnp.zeros((n_tasks,), jnp.float32)
    return Accuracies(z, z, z)


def make_pool(x: np.ndarray, y: np.ndarray, eval_batch: int) -> EvalPool:
    """Pad ``x [N, ...]``, ``y [N]`` to a multiple of ``eval_batch`` rows and cut into batches."""
    n = len(y)
    eb = max(1, min(eval_batch, n))
    pad = -n % eb
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    yp = np.concatenate([y, np.zeros(pad, y.dtype)])
    mask = np.arange(n + pad) < n
    nb = (n + pad) // eb
    return EvalPool(xp.reshape(nb, eb, *x.shape[1:]), yp.reshape(nb, eb), mask.reshape(nb, eb))


def task_argmax(logits: Array, class_task: Array, n_tasks: int) -> tuple[Array, Array]:
    """Per-task maximum logit and its class: ``([N, T] value, [N, T] class)``.

    ``class_task [C]`` gives each class's task (-1: none). A task without classes has value
    ``-inf`` and class ``C``. Ties go to the lowest class id."""
    C = logits.shape[-1]
    seg = jnp.where(class_task < 0, n_tasks, class_task)  # unused classes: overflow segment
    best = jax.vmap(lambda row: jax.ops.segment_max(row, seg, n_tasks + 1))(logits)
    hit = logits == best[:, seg]  # [N, C]: class c attains its task's maximum
    ids = jnp.where(hit, jnp.arange(C), C)
    cls = jnp.minimum(jax.vmap(lambda row: jax.ops.segment_min(row, seg, n_tasks + 1))(ids), C)
    best = jnp.where(cls[:, :n_tasks] < C, best[:, :n_tasks], -jnp.inf)
    return best, cls[:, :n_tasks]


def prefix_argmax(value: Array, cls: Array) -> Array:
    """``[N, T]``: class of the largest value among tasks ``0..k`` (ties: lowest class id)."""

    def better(a, b):  # b is the later prefix element
        va, ca = a
        vb, cb = b
        take_b = (vb > va) | ((vb == va) & (cb < ca))
        return jnp.where(take_b, vb, va), jnp.where(take_b, cb, ca)

    return jax.lax.associative_scan(better, (value, cls), axis=1)[1]


def batch_counts(logits: Array, y: Array, sample_task: Array, class_task: Array,
                 n_tasks: int) -> tuple[Array, Array, Array, Array, Array]:
    """Correct counts of one batch: ``(acc_correct [T], task_aware_correct [T],
    cumulative_correct [T], per_task_count [T], cumulative_count [T])``. ``sample_task`` is -1
    for rows that count nowhere (padding, unused classes)."""
    seg = jnp.where(sample_task < 0, n_tasks, sample_task)
    ok = sample_task >= 0
    correct = ((jnp.argmax(logits, -1) == y) & ok).astype(jnp.float32)
    value, cls = task_argmax(logits, class_task, n_tasks)
    own = jnp.take_along_axis(cls, jnp.clip(sample_task, 0)[:, None], 1)[:, 0]
    aware = ((own == y) & ok).astype(jnp.float32)
    cum_pred = prefix_argmax(value, cls)  # [N, T]
    within = ok[:, None] & (sample_task[:, None] <= jnp.arange(n_tasks)[None, :])  # [N, T]
    cum_correct = ((cum_pred == y[:, None]) & within).astype(jnp.float32).sum(0)

    def per_task(v):
        return jax.ops.segment_sum(v, seg, n_tasks + 1)[:n_tasks]

    return (per_task(correct), per_task(aware), cum_correct, per_task(ok.astype(jnp.float32)),
            within.astype(jnp.float32).sum(0))


def per_task_accuracy(
    learner: Learner, transform, eval_tasks, n_views: int, n_tasks: int,
    state, hp, key: Array, aux, pool: EvalPool,
) -> Accuracies:
    """Class-IL, task-aware and cumulative accuracy after ``prepare_eval`` (module docstring).

    Each evaluation view (one per permutation for permuted streams) runs the whole pool through
    ``predict`` in batches; samples are credited to the task ``eval_tasks`` assigns them.
    """
    eval_state = learner.prepare_eval(state, hp, key)

    def view(totals, v):
        def batch(totals, xym):
            xb, yb, mb = xym
            views = jnp.full(yb.shape, v, jnp.int32)
            logits = learner.predict(eval_state, transform(aux, views, xb), hp)
            task = jnp.where(mb, eval_tasks(aux, v, yb), -1)
            class_task = eval_tasks(aux, v, jnp.arange(logits.shape[-1], dtype=jnp.int32))
            counts = batch_counts(logits, yb, task, class_task, n_tasks)
            return tuple(a + b for a, b in zip(totals, counts, strict=True)), None

        totals, _ = jax.lax.scan(batch, totals, (pool.x, pool.y, pool.mask))
        return totals, None

    z = jnp.zeros((n_tasks,), jnp.float32)
    (correct, aware, cum, count, cum_count), _ = jax.lax.scan(
        view, (z, z, z, z, z), jnp.arange(n_views))
    return Accuracies(correct / jnp.maximum(count, 1.0), aware / jnp.maximum(count, 1.0),
                      cum / jnp.maximum(cum_count, 1.0))
