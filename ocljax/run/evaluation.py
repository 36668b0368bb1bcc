"""In-graph evaluation: per-task accuracy of one member on a held-out pool."""

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


def per_task_accuracy(
    learner: Learner, transform, eval_tasks, n_views: int, n_tasks: int,
    state, hp, key: Array, aux, pool: EvalPool,
) -> Array:
    """Accuracy on each task's test samples after ``prepare_eval``: [n_tasks] float32.

    Each evaluation view (one per permutation for permuted streams) runs the whole pool through
    ``predict`` in batches; samples are credited to the task ``eval_tasks`` assigns them.
    """
    eval_state = learner.prepare_eval(state, hp, key)

    def view(totals, v):
        def batch(totals, xym):
            xb, yb, mb = xym
            views = jnp.full(yb.shape, v, jnp.int32)
            logits = learner.predict(eval_state, transform(aux, views, xb), hp)
            correct = (jnp.argmax(logits, -1) == yb) & mb
            task = jnp.where(mb, eval_tasks(aux, v, yb), -1)
            task = jnp.where(task < 0, n_tasks, task)  # an overflow segment for unused rows
            c = jax.ops.segment_sum(correct.astype(jnp.float32), task, n_tasks + 1)
            n = jax.ops.segment_sum(mb.astype(jnp.float32), task, n_tasks + 1)
            return (totals[0] + c[:n_tasks], totals[1] + n[:n_tasks]), None

        totals, _ = jax.lax.scan(batch, totals, (pool.x, pool.y, pool.mask))
        return totals, None

    zeros = jnp.zeros((n_tasks,), jnp.float32)
    (correct, count), _ = jax.lax.scan(view, (zeros, zeros), jnp.arange(n_views))
    return correct / jnp.maximum(count, 1.0)
