"""The shared step schedule of a stream, laid out in evaluation blocks and chunks.

Every task's steps are cut into blocks of ``eval_every`` steps; the last block of a task is
padded at its end with invalid (no-op) steps so that task ends coincide with block ends (the
valid steps of every block are a prefix of it: the driver loops over them). Each block ends
with an evaluation: on the full test sets at a task's end (these give the accuracy matrix) and on
a fixed subsample otherwise (the continual-evaluation curve). With ``eval_every=0`` only task
ends are evaluated: tasks are cut into blocks of ``TASK_END_BLOCK`` steps whose evaluation is
skipped except at the task's end. A chunk is ``blocks_per_chunk``
blocks, one compiled call; the last chunk is padded with invalid blocks so no shape changes.

Full-resolution evaluation around boundaries (for the stability gap, De Lange et al. 2023):
with ``dense_every`` > 0 blocks are ``dense_every`` steps long, and the first ``dense_window``
steps of every task are evaluated after every block; elsewhere only blocks ending on a multiple
of ``eval_every`` (counted from the task's start) are, as without it.

Near-future accuracy (Hammoud et al. 2023): with ``near_future`` S > 0, each fresh step also
names the incoming batch S batches later (``StepInfo.future``, -1 past the stream's end), which
the driver scores with the model of the current step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ocljax.errors import ConfigError

EVAL_NONE, EVAL_CONTINUAL, EVAL_TASK_END = 0, 1, 2
TASK_END_BLOCK = 250  # block length when only task ends are evaluated (bounds the padding)


class StepInfo(NamedTuple):
    """Shared per-step schedule values (identical for every member); leaves [..., L]."""

    t: np.ndarray  # int32, global index of the step (counts valid steps only)
    task: np.ndarray  # int32, true task id (driver side; may be hidden from the learner)
    boundary: np.ndarray  # bool, first step of a task after the first
    fresh: np.ndarray  # bool, first pass over the incoming batch
    valid: np.ndarray  # bool, False for padding steps
    batch: np.ndarray  # int32, index of the incoming batch (into a member's order)
    future: np.ndarray  # int32, incoming batch ``near_future`` batches later (-1: none / off)


# the values of a step that does nothing: a chunk's padding, and every step of
# ``evaluation_chunk``
NO_STEP = StepInfo(t=-1, task=0, boundary=False, fresh=False, valid=False, batch=0, future=-1)


class Chunk(NamedTuple):
    """One compiled call's worth of stream: ``nb`` blocks of ``L`` steps."""

    idx: np.ndarray  # [M, nb, L, B] int32 pool indices of each member's batch
    future_idx: np.ndarray | None  # [M, nb, L, B] the batch ``future`` names (None: off)
    steps: StepInfo  # leaves [nb, L]
    eval_kind: np.ndarray  # [nb] int32: EVAL_NONE / EVAL_CONTINUAL / EVAL_TASK_END
    block_task: np.ndarray  # [nb] int32, task being trained during the block
    end_step: np.ndarray  # [nb] int32, steps done when the block's evaluation runs


@dataclass(frozen=True)
class Schedule:
    """Block layout of a stream with ``task_batches[k]`` incoming batches in task ``k``."""

    steps: StepInfo  # leaves [n_blocks, L]
    eval_kind: np.ndarray  # [n_blocks]
    block_task: np.ndarray  # [n_blocks]
    end_step: np.ndarray  # [n_blocks]
    total_steps: int
    near_future: int = 0

    @property
    def n_blocks(self) -> int:
        return len(self.eval_kind)

    @property
    def block_len(self) -> int:
        return self.steps.t.shape[1]


def build(task_batches: list[int], passes: int, eval_every: int, dense_every: int = 0,
          dense_window: int = 0, near_future: int = 0) -> Schedule:
    """Lay out ``sum(task_batches) * passes`` steps in blocks of ``eval_every`` steps (of
    ``TASK_END_BLOCK`` steps evaluated only at task ends when ``eval_every`` is 0; of
    ``dense_every`` steps when dense evaluation is on - see the module docstring)."""
    if dense_every and eval_every % dense_every:
        raise ConfigError(f"eval_every ({eval_every}) must be a multiple of the dense "
                          f"evaluation interval ({dense_every})")
    L = dense_every or eval_every or TASK_END_BLOCK
    total_batches = int(sum(task_batches))
    rows = []
    t = batch0 = 0
    for task, n_batches in enumerate(task_batches):
        n_steps = n_batches * passes
        n_blocks = -(-n_steps // L)
        s = np.arange(n_blocks * L)
        valid = s < n_steps
        fresh = valid & (s % passes == 0)
        batch = np.where(valid, batch0 + s // passes, 0)
        ahead = batch + near_future
        ends = (np.arange(n_blocks) + 1) * L  # block end, in steps since the task's start
        kind = np.full(n_blocks, EVAL_NONE)
        if eval_every:
            kind[ends % eval_every == 0] = EVAL_CONTINUAL
        if dense_every:
            kind[ends <= dense_window] = EVAL_CONTINUAL
        kind[-1] = EVAL_TASK_END
        rows.append(
            dict(
                t=np.where(valid, t + s, -1),
                task=np.full(s.shape, task),
                boundary=(s == 0) & (task > 0),
                fresh=fresh,
                valid=valid,
                batch=batch,
                future=np.where(fresh & (near_future > 0) & (ahead < total_batches), ahead, -1),
                eval_kind=kind,
                block_task=np.full(n_blocks, task),
                end_step=np.minimum(ends, n_steps) + t,
            )
        )
        t += n_steps
        batch0 += n_batches
    cat = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    steps = StepInfo(
        t=cat["t"].astype(np.int32).reshape(-1, L),
        task=cat["task"].astype(np.int32).reshape(-1, L),
        boundary=cat["boundary"].reshape(-1, L),
        fresh=cat["fresh"].reshape(-1, L),
        valid=cat["valid"].reshape(-1, L),
        batch=cat["batch"].astype(np.int32).reshape(-1, L),
        future=cat["future"].astype(np.int32).reshape(-1, L),
    )
    return Schedule(steps, cat["eval_kind"].astype(np.int32), cat["block_task"].astype(np.int32),
                    cat["end_step"].astype(np.int32), t, near_future)


def chunks(schedule: Schedule, orders: np.ndarray, blocks_per_chunk: int, start_block: int = 0):
    """Yield ``Chunk``s of ``blocks_per_chunk`` blocks; ``orders`` [M, n_batches, B] holds each
    member's incoming batches. The last chunk is padded with invalid blocks."""
    nb = blocks_per_chunk
    for b0 in range(start_block, schedule.n_blocks, nb):
        sl = slice(b0, b0 + nb)
        pad = nb - len(schedule.eval_kind[sl])

        def take(a, fill, pad=pad, sl=sl):
            part = a[sl]
            if pad:
                part = np.concatenate([part, np.full((pad, *part.shape[1:]), fill, part.dtype)])
            return part

        steps = StepInfo(*(take(a, fill) for a, fill in zip(schedule.steps, NO_STEP,
                                                             strict=True)))
        yield Chunk(
            idx=orders[:, steps.batch],
            future_idx=orders[:, np.maximum(steps.future, 0)] if schedule.near_future else None,
            steps=steps,
            eval_kind=take(schedule.eval_kind, EVAL_NONE),
            block_task=take(schedule.block_task, 0),
            end_step=take(schedule.end_step, -1),
        )


def evaluation_chunk(layout: Chunk) -> Chunk:
    """A chunk shaped like ``layout`` whose blocks train nothing (every step invalid) and
    whose first block evaluates on the full test sets at step 0: the initial evaluation, run
    by the chunk program itself instead of a program of its own (one compilation less per
    run). Its evaluation key is the one the evaluation after step 0 would use."""
    nb = len(layout.eval_kind)
    steps = StepInfo(*(np.full(a.shape, fill, a.dtype) for a, fill in zip(layout.steps, NO_STEP,
                                                                          strict=True)))
    kind = np.full(nb, EVAL_NONE, np.int32)
    kind[0] = EVAL_TASK_END
    end = np.full(nb, -1, np.int32)
    end[0] = 0
    return Chunk(
        idx=np.zeros_like(layout.idx),
        future_idx=None if layout.future_idx is None else np.zeros_like(layout.future_idx),
        steps=steps, eval_kind=kind, block_task=np.zeros(nb, np.int32), end_step=end,
    )

