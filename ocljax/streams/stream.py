"""A stream: each member's sequence of incoming batches plus what evaluation needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ocljax.errors import ConfigError, require_positive, unknown_choice
from ocljax.streams import schedule as schedule_lib

KINDS = ("split", "permuted", "rotated")


@dataclass(frozen=True)
class StreamConfig:
    """Static settings of a stream (changing them changes shapes, so recompiles).

    kind: ``split`` (class-incremental), ``permuted`` (domain-incremental, one random pixel
        permutation per task) or ``rotated`` (domain-incremental, one rotation angle per task).
    iid: shuffle all tasks' samples into one i.i.d. stream of the same length (the joint
        upper bound), evaluated on the same per-task test sets, with no task structure shown.
    n_tasks; batch_size: incoming samples per step; passes: how many consecutive steps train on
        each incoming batch (``mem_iters`` in the OCL surveys); task_free: hide task ids and
        boundaries from the learner; class_order: ``fixed`` (0, 1, 2, ...) or ``random``
        (drawn per seed); samples_per_task: cap on training samples per task (0 = all);
        eval_every: steps between continual evaluations (0: evaluate at task ends only, as
        most papers' accuracy matrices and the PyTorch baseline do); eval_per_task: test
        samples per task in continual evaluations (0 = all); test_per_task: test samples per
        task in task-end evaluations, which give the accuracy matrix (0 = all).
    eval_dense_every, eval_dense_window: evaluate every ``eval_dense_every`` steps during the
        first ``eval_dense_window`` steps of each task (0: off) - full resolution around the
        boundaries, where the stability gap shows (``eval_every`` must be a multiple).
    near_future: S > 0 also scores the model of each step on the incoming batch S batches later
        (near-future accuracy, Hammoud et al. 2023; 0: off, it costs one forward pass a step).
    blind_window: labels the input-blind baseline remembers (``ocljax.learners.blind``), tracked
        beside every run's online and near-future accuracy (0: not tracked).
    blurry: fraction of every task's training samples exchanged with the other tasks (blurry
        task boundaries, ``blur_tasks``; e.g. 0.1 is Blurry10; 0: disjoint tasks).
    max_rotation: ``rotated`` streams: task ``k``'s angle is drawn uniformly in
        ``[k, k + 1) * max_rotation / n_tasks`` degrees (``ocljax.streams.rotated``).
    """

    kind: str = "split"
    iid: bool = False
    n_tasks: int = 5
    batch_size: int = 10
    passes: int = 1
    task_free: bool = False
    class_order: str = "fixed"
    samples_per_task: int = 0
    eval_every: int = 50
    eval_per_task: int = 500
    test_per_task: int = 0
    eval_dense_every: int = 0
    eval_dense_window: int = 0
    near_future: int = 0
    blind_window: int = 50
    blurry: float = 0.0
    max_rotation: float = 180.0

    def check(self) -> None:
        """Raise ``ConfigError`` for unknown kinds and impossible sizes."""
        if self.kind not in KINDS:
            raise ConfigError(unknown_choice("stream", self.kind, KINDS))
        if self.class_order not in ("fixed", "random"):
            raise ConfigError(f"class_order must be 'fixed' or 'random', got {self.class_order!r}")
        require_positive(self, "n_tasks", "batch_size", "passes")
        for name in ("samples_per_task", "eval_every", "eval_per_task", "test_per_task",
                     "eval_dense_every", "eval_dense_window", "near_future"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.blurry < 1:
            raise ConfigError(f"blurry must be in [0, 1), got {self.blurry}")
        if self.blurry and self.n_tasks < 2:
            raise ConfigError(f"blurry={self.blurry:g} needs at least 2 tasks to mix, got "
                              f"n_tasks={self.n_tasks}")
        if not 0 <= self.max_rotation <= 360:
            raise ConfigError(f"max_rotation must be in [0, 360] degrees, got {self.max_rotation}")
        if self.blind_window < 0:
            raise ConfigError(f"blind_window must be >= 0, got {self.blind_window}")
        if self.eval_dense_every and self.eval_every % self.eval_dense_every:
            raise ConfigError(f"eval_every ({self.eval_every}) must be a multiple of "
                              f"eval_dense_every ({self.eval_dense_every})")
        if self.eval_dense_window and not self.eval_dense_every:
            raise ConfigError("eval_dense_window needs eval_dense_every > 0")


@dataclass
class Stream:
    """Host-side description of a stream for ``M`` members.

    ``orders`` index a *virtual* pool of ``n_views * N`` samples: entry ``v * N + i`` is pool
    sample ``i`` as view ``v`` shows it (``permuted``: view = task, whose permutation applies),
    so an i.i.d. mixture of tasks is just a shuffled order. ``transform(aux_m, views [B],
    x [B, ...])`` applies the views; ``eval_tasks(aux_m, view, y)`` gives the task [N] each
    test sample of evaluation view ``view`` counts towards (-1: none). Both are pure jnp
    functions of one member's ``aux`` leaves.
    """

    cfg: StreamConfig
    n_tasks: int
    task_batches: list[int]
    orders: np.ndarray  # [M, n_batches, B] int32 indices into the virtual pool
    aux: dict[str, np.ndarray]  # leaves [M, ...]
    transform: Callable
    eval_tasks: Callable
    n_views: int
    eval_full: np.ndarray  # [Nf] int32 test indices for task-end evaluations
    eval_continual: np.ndarray  # [Nc] int32 test indices for continual evaluations
    task_classes: list[list[list[int]]] = field(default_factory=list)  # [M][task] classes
    member_info: list[dict] = field(default_factory=list)  # [M] more of each member's stream
    schedule: schedule_lib.Schedule = None

    def __post_init__(self):
        c = self.cfg
        self.schedule = schedule_lib.build(self.task_batches, c.passes, c.eval_every,
                                           c.eval_dense_every, c.eval_dense_window,
                                           c.near_future)

    @property
    def n_members(self) -> int:
        return self.orders.shape[0]

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def chunks(self, blocks_per_chunk: int, start_block: int = 0):
        """Generator of ``schedule.Chunk`` (see ``ocljax.streams.schedule.chunks``)."""
        return schedule_lib.chunks(self.schedule, self.orders, blocks_per_chunk, start_block)


def member_rng(seed: int, salt: int) -> np.random.Generator:
    """The numpy generator a member uses for stream purpose ``salt``: a function of its seed
    only, so a member's stream never depends on the rest of the sweep."""
    return np.random.default_rng([int(seed), salt])


def stratified_subset(y: np.ndarray, per_class: int, seed: int = 1234) -> np.ndarray:
    """Sorted indices of up to ``per_class`` samples of each class (all when 0): [N'] int32."""
    if per_class <= 0:
        return np.arange(len(y), dtype=np.int32)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    return np.sort(np.concatenate(keep)).astype(np.int32)


def mix_tasks(per_task: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the samples of all tasks together and recut them into the same task lengths."""
    sizes = [len(p) for p in per_task]
    mixed = rng.permutation(np.concatenate(per_task))
    return np.split(mixed, np.cumsum(sizes)[:-1])


def blur_tasks(per_task: list[np.ndarray], fraction: float,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Blurry task boundaries: ``fraction`` of every task's samples move to the other tasks.

    The blurry setup of Bang et al. 2021 ("Rainbow Memory", CVPR; in its Blurry-K each task
    holds its own "major" classes plus K% of its samples from the other tasks' classes), also
    the blurry part of Koh et al. 2022's i-Blurry (ICLR). Task ``k`` gives
    ``round(fraction * len)`` of its samples (the last of its random order) and receives as many
    from the other tasks: each given sample goes to a random *other* task, subject to those
    counts (uniformly over the other tasks when all tasks are of one size). Every task is then
    reshuffled, so its guests arrive throughout it. Task lengths, the samples used and the test
    sets are unchanged; a class still belongs to the task it is major in. When one task gives
    more than all the others together (two tasks of unequal size), the samples that cannot
    leave stay in their own task. ``ConfigError`` when no task gives a sample."""
    sizes = np.array([len(p) for p in per_task])
    give = np.rint(fraction * sizes).astype(int)
    if len(per_task) < 2:
        return per_task
    if give.sum() == 0:
        raise ConfigError(
            f"blurry={fraction:g} moves no sample: it is {fraction:g} x {sizes.max()} samples "
            f"in the largest task, which rounds to 0; use blurry >= {1 / sizes.max():.2g}")
    src = np.repeat(np.arange(len(per_task)), give)  # donor task of each given sample
    dst = rng.permutation(src)  # its receiving task: the same counts
    for task in range(len(per_task)):  # repair: send the samples that stay home elsewhere
        home = np.flatnonzero((src == task) & (dst == task))
        # swap partners: a sample neither from nor bound for this task, so that neither of the
        # two stays home after the swap (and no earlier repair is undone)
        other = np.flatnonzero((src != task) & (dst != task))
        n = min(len(home), len(other))  # short only when one task gives more than the rest
        pick = rng.choice(other, n, replace=False)
        dst[home[:n]], dst[pick] = dst[pick], dst[home[:n]]
    if not (src != dst).any():
        raise ConfigError(
            f"blurry={fraction:g} moves no sample: only task(s) "
            f"{', '.join(map(str, np.flatnonzero(give)))} give any (tasks of {sizes.tolist()} "
            "samples), and they have no other task to give them to; use a larger blurry")
    given = np.concatenate([p[len(p) - g:] for p, g in zip(per_task, give, strict=True)])
    return [rng.permutation(np.concatenate([p[:len(p) - g], given[dst == k]]))
            for k, (p, g) in enumerate(zip(per_task, give, strict=True))]


def arrange_tasks(cfg: StreamConfig, per_task: list[np.ndarray],
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Each task's training samples in arrival order after the stream's mixing: ``iid``
    shuffles all tasks together (``mix_tasks``), else ``blurry`` exchanges that fraction of
    every task's samples with the other tasks (``blur_tasks``). An i.i.d. stream ignores
    ``blurry``, so an experiment's ``NAME@iid`` upper bound is the same with or without it."""
    if cfg.iid:
        return mix_tasks(per_task, rng)
    if cfg.blurry:
        return blur_tasks(per_task, cfg.blurry, rng)
    return per_task


def batches(indices: np.ndarray, batch_size: int) -> np.ndarray:
    """Cut ``indices`` into full batches ``[n, B]`` (a ragged tail is dropped)."""
    n = len(indices) // batch_size
    return indices[: n * batch_size].reshape(n, batch_size)
