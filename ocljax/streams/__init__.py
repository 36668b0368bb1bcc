"""Streams: class-incremental split, permuted (domain-incremental) and i.i.d. (upper bound)."""

from __future__ import annotations

from ocljax.data.dataset import Dataset
from ocljax.streams import permuted, split
from ocljax.streams.schedule import EVAL_CONTINUAL, EVAL_NONE, EVAL_TASK_END, Chunk, StepInfo
from ocljax.streams.stream import KINDS, Stream, StreamConfig


def build(cfg: StreamConfig, ds: Dataset, seeds: list[int]) -> Stream:
    """The stream ``cfg.kind`` over ``ds`` for one member per entry of ``seeds``.

    With ``cfg.iid`` the same samples (and number of steps) arrive shuffled across tasks: the
    joint upper bound, evaluated on the same per-task test sets.
    """
    if cfg.kind == "permuted":
        return permuted.build(cfg, ds, seeds)
    return split.build(cfg, ds, seeds)


__all__ = [
    "EVAL_CONTINUAL", "EVAL_NONE", "EVAL_TASK_END", "KINDS", "Chunk", "StepInfo", "Stream",
    "StreamConfig", "build",
]
