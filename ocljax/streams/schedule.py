"""The shared step schedule of a stream, laid out in evaluation blocks and chunks.

Every task's steps are cut into blocks of ``eval_every`` steps; the last block of a task is
padded with invalid (no-op) steps so that task ends coincide with block ends. Each block ends
with an evaluation: on the full test sets at a task's end (these give the accuracy matrix) and on
a fixed subsample otherwise (the continual-evaluation curve). With ``eval_every=0`` only task
ends are evaluated: tasks are cut into blocks of ``TASK_END_BLOCK`` steps whose evaluation is
skipped except at the task's end. A chunk is ``blocks_per_chunk``
blocks, one compiled call; the last chunk is padded with invalid blocks so no shape changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

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


class Chunk(NamedTuple):
    """One compiled call's worth of stream: ``nb`` blocks of ``L`` steps."""

    idx: np.ndarray  # [M, nb, L, B] int32 pool indices of each member's batch
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

    @property
    def n_blocks(self) -> int:
        return len(self.eval_kind)

    @property
    def block_len(self) -> int:
        return self.steps.t.shape[1]


def build(task_batches: list[int], passes: int, eval_every: int) -> Schedule:
    """Lay out ``sum(task_batches) * passes`` steps in blocks of ``eval_every`` steps (of
    ``TASK_END_BLOCK`` steps evaluated only at task ends when ``eval_every`` is 0)."""
    L = eval_every or TASK_END_BLOCK
    between = EVAL_CONTINUAL if eval_every else EVAL_NONE
    rows = []
    t = batch0 = 0
    for task, n_batches in enumerate(task_batches):
        n_steps = n_batches * passes
        n_blocks = -(-n_steps // L)
        s = np.arange(n_blocks * L)
        valid = s < n_steps
        rows.append(
            dict(
                t=np.where(valid, t + s, -1),
                task=np.full(s.shape, task),
                boundary=(s == 0) & (task > 0),
                fresh=valid & (s % passes == 0),
                valid=valid,
                batch=np.where(valid, batch0 + s // passes, 0),
                eval_kind=np.where(np.arange(n_blocks) == n_blocks - 1, EVAL_TASK_END,
                                   between),
                block_task=np.full(n_blocks, task),
                end_step=np.minimum((np.arange(n_blocks) + 1) * L, n_steps) + t,
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
    )
    return Schedule(steps, cat["eval_kind"].astype(np.int32), cat["block_task"].astype(np.int32),
                    cat["end_step"].astype(np.int32), t)


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

        steps = StepInfo(
            t=take(schedule.steps.t, -1), task=take(schedule.steps.task, 0),
            boundary=take(schedule.steps.boundary, False), fresh=take(schedule.steps.fresh, False),
            valid=take(schedule.steps.valid, False), batch=take(schedule.steps.batch, 0),
        )
        yield Chunk(
            idx=orders[:, steps.batch],
            steps=steps,
            eval_kind=take(schedule.eval_kind, EVAL_NONE),
            block_task=take(schedule.block_task, 0),
            end_step=take(schedule.end_step, -1),
        )
