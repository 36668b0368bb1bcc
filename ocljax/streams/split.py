"""Class-incremental split streams (e.g. split MNIST: 5 tasks of 2 classes each).

Task ``k`` holds the classes ``order[k*cpt:(k+1)*cpt]``; its training samples arrive shuffled.
``class_order="random"`` draws the order per seed. Task lengths must be the same for every
member (the schedule is shared), so with random orders each task is cut to the size of the
smallest possible task (the sum of the ``cpt`` smallest class counts); with the fixed order
every sample is used (up to a ragged final batch per task).
"""

from __future__ import annotations

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

ORDER_SALT, SHUFFLE_SALT = 11, 12


def class_orders(cfg: StreamConfig, num_classes: int, seeds: list[int]) -> np.ndarray:
    """Class order of each member: [M, C] int32."""
    if cfg.class_order == "fixed":
        return np.tile(np.arange(num_classes, dtype=np.int32), (len(seeds), 1))
    return np.stack([member_rng(s, ORDER_SALT).permutation(num_classes) for s in seeds]).astype(
        np.int32
    )


def task_sizes(cfg: StreamConfig, y: np.ndarray, num_classes: int) -> list[int]:
    """Training samples per task, identical for every member."""
    if num_classes % cfg.n_tasks:
        raise ConfigError(
            f"{num_classes} classes cannot be split into {cfg.n_tasks} equal tasks"
        )
    cpt = num_classes // cfg.n_tasks
    counts = np.bincount(y, minlength=num_classes)
    if cfg.class_order == "fixed":
        sizes = [int(counts[k * cpt:(k + 1) * cpt].sum()) for k in range(cfg.n_tasks)]
    else:
        sizes = [int(np.sort(counts)[:cpt].sum())] * cfg.n_tasks
    if cfg.samples_per_task:
        sizes = [min(s, cfg.samples_per_task) for s in sizes]
    for k, s in enumerate(sizes):
        if s < cfg.batch_size:
            raise ConfigError(
                f"task {k} has {s} training samples, fewer than batch_size={cfg.batch_size}"
            )
    return sizes


def member_orders(cfg, ds: Dataset, orders: np.ndarray, seeds, sizes):
    """Each member's incoming batches [M, n_batches, B]; ``cfg.blurry`` and ``cfg.iid`` mix
    the tasks' samples (``arrange_tasks``), keeping every task's length."""
    cpt = ds.num_classes // cfg.n_tasks
    out = []
    for seed, order in zip(seeds, orders, strict=True):
        rng = member_rng(seed, SHUFFLE_SALT)
        per_task = []
        for k, size in enumerate(sizes):
            pool = np.flatnonzero(np.isin(ds.train_y, order[k * cpt:(k + 1) * cpt]))
            per_task.append(rng.permutation(pool)[:size])
        per_task = arrange_tasks(cfg, per_task, rng)
        out.append(np.concatenate([batches(p, cfg.batch_size) for p in per_task]))
    return np.stack(out).astype(np.int32)


def eval_tasks(aux, view, y):
    """Task of each test sample: the task its class belongs to (-1 for unused classes)."""
    del view
    return aux["task_of_class"][y]


def identity(aux, views, x):
    """Split streams show the pool's inputs unchanged."""
    del aux, views
    return x


def build(cfg: StreamConfig, ds: Dataset, seeds: list[int]) -> Stream:
    """The class-incremental split stream of ``ds`` for members with the given seeds."""
    cfg.check()
    sizes = task_sizes(cfg, ds.train_y, ds.num_classes)
    orders = class_orders(cfg, ds.num_classes, seeds)
    cpt = ds.num_classes // cfg.n_tasks
    task_of_class = np.empty_like(orders)
    for m, order in enumerate(orders):
        task_of_class[m, order] = np.arange(ds.num_classes) // cpt
    return Stream(
        cfg=cfg,
        n_tasks=cfg.n_tasks,
        task_batches=[s // cfg.batch_size for s in sizes],
        orders=member_orders(cfg, ds, orders, seeds, sizes),
        aux={"task_of_class": task_of_class},
        transform=identity,
        eval_tasks=eval_tasks,
        n_views=1,
        eval_full=stratified_subset(ds.test_y, -(-cfg.test_per_task // cpt)),
        eval_continual=stratified_subset(ds.test_y, -(-cfg.eval_per_task // cpt)),
        task_classes=[[o[k * cpt:(k + 1) * cpt].tolist() for k in range(cfg.n_tasks)]
                      for o in orders],
    )

