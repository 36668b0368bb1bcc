"""Permuted streams (domain-incremental): every task shows all classes under its own fixed
random pixel permutation (Goodfellow et al. 2013, "An Empirical Investigation of Catastrophic
Forgetting in Gradient-Based Neural Networks", Sec. 5.2; Kirkpatrick et al. 2017 "EWC").

Permutations are drawn per seed; task ``k`` trains on ``samples_per_task`` samples (all when 0)
of the training pool in a fresh random order, and is tested on the whole test set permuted
the same way (one evaluation view per task).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from ocljax.data.dataset import Dataset
from ocljax.errors import ConfigError
from ocljax.streams.stream import (
    Stream,
    StreamConfig,
    arrange_tasks,
    batches,
    member_rng,
    stratified_subset,
)

PERM_SALT, SHUFFLE_SALT = 21, 22


def transform(aux, views, x):
    """Apply each sample's task permutation: ``views`` [B] task ids, ``x`` [B, H, W, C]."""
    flat = x.reshape(x.shape[0], -1)
    return jnp.take_along_axis(flat, aux["perm"][views], axis=1).reshape(x.shape)


def eval_tasks(aux, view, y):
    """Every test sample of view ``view`` counts towards task ``view``."""
    del aux
    return jnp.full(y.shape, view, jnp.int32)


def build(cfg: StreamConfig, ds: Dataset, seeds: list[int]) -> Stream:
    """The permuted stream of ``ds`` for members with the given seeds."""
    dim = int(np.prod(ds.train_x.shape[1:]))

    def views(seed: int):
        prng = member_rng(seed, PERM_SALT)
        perms = [prng.permutation(dim) for _ in range(cfg.n_tasks)]
        return {"perm": np.stack(perms).astype(np.int32)}

    return view_stream(cfg, ds, seeds, views, transform)


def view_stream(cfg: StreamConfig, ds: Dataset, seeds: list[int],
                views: Callable[[int], dict[str, np.ndarray]], transform: Callable) -> Stream:
    """A domain-incremental stream whose task ``k`` shows every sample as view ``k``:
    ``views(seed)`` gives one member's ``aux`` leaves (e.g. ``perm`` [T, D]), ``transform``
    applies them. Task ``k`` trains on ``samples_per_task`` samples (all when 0) of the training
    pool in a fresh random order and is tested on the test set under its view."""
    cfg.check()
    n_train = len(ds.train_y)
    size = min(cfg.samples_per_task or n_train, n_train)
    if size < cfg.batch_size:
        raise ConfigError(f"samples_per_task={size} is smaller than batch_size={cfg.batch_size}")
    aux, orders = [], []
    for seed in seeds:
        aux.append(views(seed))
        srng = member_rng(seed, SHUFFLE_SALT)
        # virtual index task * N + i: pool sample i under task's view
        per_task = [k * n_train + srng.permutation(n_train)[:size] for k in range(cfg.n_tasks)]
        per_task = arrange_tasks(cfg, per_task, srng)
        orders.append(np.concatenate([batches(p, cfg.batch_size) for p in per_task]))
    per_class = -(-cfg.test_per_task // ds.num_classes)
    return Stream(
        cfg=cfg,
        n_tasks=cfg.n_tasks,
        task_batches=[size // cfg.batch_size] * cfg.n_tasks,
        orders=np.stack(orders).astype(np.int32),
        aux={k: np.stack([a[k] for a in aux]) for k in aux[0]},
        transform=transform,
        eval_tasks=eval_tasks,
        n_views=cfg.n_tasks,
        eval_full=stratified_subset(ds.test_y, per_class),
        eval_continual=stratified_subset(ds.test_y, -(-cfg.eval_per_task // ds.num_classes)),
        task_classes=[[list(range(ds.num_classes))] * cfg.n_tasks for _ in seeds],
    )
