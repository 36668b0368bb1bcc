"""Linear-probe ("probed") accuracy: how linearly separable a learner's frozen representation is.

Soutif-Cormerais et al. 2023, "A Comprehensive Empirical Evaluation on Online Continual
Learning", Sec. 4 ("probed accuracy"): freeze the representation, fit a fresh linear classifier
on the training data of the classes seen so far, report its test accuracy. A learner whose
classifier head forgets but whose features still separate old classes scores high here and low
on plain accuracy.

Everything is pure JAX with static shapes (``jit`` and ``vmap`` over members work; ``num_classes``,
``steps`` and ``batch`` are static Python ints, ``lr`` and ``l2`` may be traced):

- features are standardised with the *masked* training rows' mean and standard deviation
  (features with a near-zero spread, e.g. dead ReLUs, get scale 0), which makes the probe
  invariant to a rescaling of the representation;
- the classifier is multinomial logistic regression, ``mean masked CE + (l2 / 2) ||W||^2`` (bias
  not penalised), started from zero and optimised full-batch for a fixed number of steps with
  Adam under a cosine-decayed step size. Adam rather than plain gradient descent: gradient
  descent's stable step is ``~ 1 / lambda_max`` of the feature covariance, which varies by orders
  of magnitude between an MLP and a ResNet (correlated features), so one fixed step size would be
  either unstable or very slow; Adam's per-coordinate normalisation makes one ``lr`` work across
  models, and the decay to zero lets it settle instead of oscillating around the (unique,
  L2-regularised) optimum;
- classes with no masked training row are never predicted: they are excluded from the softmax
  while fitting and their bias is ``-inf`` in the returned parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ocljax.types import Array, PyTree

# Defaults sized for MNIST-like runs (a few thousand training rows, F of a few hundred): on
# 3000 MNIST rows x 256 features (random-init MLP and CNN) the fit takes ~0.45 s per member on a
# busy 2-core CPU (~0.2 s at steps=100, ~1 pt lower) and its test accuracy is within 0.1 pt of
# sklearn's exact L-BFGS optimum of the same objective (l2 = 1 / (C N)).
STEPS = 200
LR = 0.05
L2 = 1e-3
BATCH = 512

_ABSENT = -1e30  # logit offset for absent classes while fitting (finite: keeps gradients finite)


class ProbeParams(NamedTuple):
    """A fitted probe: ``logits = ((f - mean) * scale) @ W + b``; ``b`` is -inf for classes that
    had no training row, so they are never predicted."""

    W: Array  # [F, C]
    b: Array  # [C]
    mean: Array  # [F]
    scale: Array  # [F]  1 / std, 0 for (near-)constant features


def _standardiser(features: Array, mask: Array) -> tuple[Array, Array]:
    """Masked mean [F] and inverse standard deviation [F] (0 where the spread is below 1e-6 of
    the largest feature's, so constant features cannot blow up on test rows)."""
    w = mask.astype(jnp.float32)[:, None]
    n = jnp.maximum(w.sum(), 1.0)
    mean = (features * w).sum(0) / n
    std = jnp.sqrt((jnp.square(features - mean) * w).sum(0) / n)
    keep = std > 1e-6 * std.max()
    return mean, jnp.where(keep, 1.0 / jnp.where(keep, std, 1.0), 0.0)


def fit_linear_probe(
    features: Array, labels: Array, mask: Array, num_classes: int, *,
    steps: int = STEPS, lr=LR, l2=L2,
) -> ProbeParams:
    """Fit a standardised multinomial logistic-regression probe on the rows where ``mask``.

    features [N, F] (any float dtype; computed in float32), labels [N] int32, mask [N] bool.
    Minimises ``mean_{mask} CE + (l2 / 2) ||W||^2`` from zero with ``steps`` full-batch Adam steps
    (step size ``lr``, cosine-decayed to 0). Classes with no masked row get ``b = -inf`` (never
    predicted); when no row is masked at all every class is kept (and the probe is all zeros).
    Soutif-Cormerais et al. 2023, Sec. 4, "probed accuracy".
    """
    features = jnp.asarray(features, jnp.float32)
    mask = jnp.asarray(mask, bool)
    labels = jnp.asarray(labels, jnp.int32)
    mean, scale = _standardiser(features, mask)
    z = (features - mean) * scale
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[:, None]
    present = onehot.sum(0) > 0
    present = present | ~present.any()
    offset = jnp.where(present, 0.0, _ABSENT)
    n = jnp.maximum(mask.sum(), 1).astype(jnp.float32)

    def loss_fn(wb):
        W, b = wb
        logp = jax.nn.log_softmax(z @ W + b + offset)
        # onehot is 0 on unmasked rows, so they (and their possibly absent labels) drop out
        return -(onehot * jnp.where(onehot > 0, logp, 0.0)).sum() / n + 0.5 * l2 * jnp.sum(W * W)

    tx = optax.adam(optax.cosine_decay_schedule(1.0, max(steps, 1)))
    F = features.shape[1]
    wb = (jnp.zeros((F, num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))

    def step(carry, _):
        wb, opt = carry
        grads = jax.grad(loss_fn)(wb)
        updates, opt = tx.update(grads, opt)
        wb = jax.tree.map(lambda p, u: p + lr * u, wb, updates)
        return (wb, opt), None

    (wb, _), _ = jax.lax.scan(step, (wb, tx.init(wb)), None, length=steps)
    W, b = wb
    return ProbeParams(W, jnp.where(present, b, -jnp.inf), mean, scale)


def probe_predict(params: ProbeParams, features: Array) -> Array:
    """Probe logits [N, C] for ``features`` [N, F]; -inf for classes absent when fitting."""
    z = (jnp.asarray(features, jnp.float32) - params.mean) * params.scale
    return z @ params.W + params.b


def batched_features(
    features_fn: Callable[..., Array], state: PyTree, hp, x: Array, batch: int = BATCH
) -> Array:
    """``features_fn(state, x, hp)`` over ``x`` [N, ...] in fixed batches of ``batch`` rows
    (``lax.map``, so memory stays bounded): [N, F] float32. The last batch is zero-padded; the
    padding rows are dropped (evaluation-mode features are computed row by row)."""
    N = x.shape[0]
    b = max(1, min(batch, N))
    nb = -(-N // b)
    xp = jnp.concatenate([x, jnp.zeros((nb * b - N, *x.shape[1:]), x.dtype)])
    feats = jax.lax.map(lambda xb: features_fn(state, xb, hp), xp.reshape(nb, b, *x.shape[1:]))
    return feats.reshape(nb * b, feats.shape[-1])[:N].astype(jnp.float32)


def _probe_correct(features_fn, state, hp, train_x, train_y, train_mask, test_x, test_y,
                   num_classes, steps, lr, l2, batch) -> Array:
    """[N_test] bool: the fitted probe's argmax equals ``test_y``."""
    params = fit_linear_probe(batched_features(features_fn, state, hp, train_x, batch), train_y,
                              train_mask, num_classes, steps=steps, lr=lr, l2=l2)
    logits = probe_predict(params, batched_features(features_fn, state, hp, test_x, batch))
    return jnp.argmax(logits, -1) == test_y


def linear_probe_accuracy(
    features_fn: Callable[..., Array], state: PyTree, hp,
    train_x: Array, train_y: Array, train_mask: Array,
    test_x: Array, test_y: Array, test_mask: Array, num_classes: int, *,
    steps: int = STEPS, lr=LR, l2=L2, batch: int = BATCH,
) -> Array:
    """Probed accuracy [] of one member: fit a linear probe on ``features_fn(state, ., hp)`` of
    the masked training rows (the seen classes' training data), return its accuracy over the
    masked test rows (0 when none is masked).

    ``features_fn`` is ``Learner.features``; pass a state returned by ``prepare_eval``. ``x``
    arrays are [N, ...] in the pool's dtype, labels [N] int32, masks [N] bool.
    Soutif-Cormerais et al. 2023, "A Comprehensive Empirical Evaluation on Online Continual
    Learning", Sec. 4, "probed accuracy".
    """
    correct = _probe_correct(features_fn, state, hp, train_x, train_y, train_mask, test_x,
                             test_y, num_classes, steps, lr, l2, batch) & test_mask
    return correct.sum() / jnp.maximum(test_mask.sum(), 1)


def linear_probe_task_accuracy(
    features_fn: Callable[..., Array], state: PyTree, hp,
    train_x: Array, train_y: Array, train_mask: Array,
    test_x: Array, test_y: Array, test_mask: Array, test_task: Array,
    num_tasks: int, num_classes: int, *,
    steps: int = STEPS, lr=LR, l2=L2, batch: int = BATCH,
) -> Array:
    """Probed accuracy on each task's test rows: [num_tasks] float32.

    As ``linear_probe_accuracy`` (one probe over all seen classes), with the masked test rows
    credited to ``test_task`` [N_test] int32 by segment sums; rows with a task outside
    ``[0, num_tasks)`` are ignored, and a task with no row scores 0 (as in
    ``ocljax.run.evaluation.per_task_accuracy``). Soutif-Cormerais et al. 2023, Sec. 4.
    """
    correct = _probe_correct(features_fn, state, hp, train_x, train_y, train_mask, test_x,
                             test_y, num_classes, steps, lr, l2, batch)
    task = jnp.asarray(test_task, jnp.int32)
    task = jnp.where(test_mask & (task >= 0) & (task < num_tasks), task, num_tasks)
    hits = jax.ops.segment_sum((correct & test_mask).astype(jnp.float32), task, num_tasks + 1)
    count = jax.ops.segment_sum(test_mask.astype(jnp.float32), task, num_tasks + 1)
    return hits[:num_tasks] / jnp.maximum(count[:num_tasks], 1.0)
