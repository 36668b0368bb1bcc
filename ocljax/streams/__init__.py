"""Streams: class-incremental split, permuted and rotated (domain-incremental), each also
with blurry task boundaries, and i.i.d. (upper bound)."""

from __future__ import annotations

from ocljax.data.dataset import Dataset, validate
from ocljax.errors import ConfigError
from ocljax.streams import permuted, rotated, split
from ocljax.streams.schedule import EVAL_CONTINUAL, EVAL_NONE, EVAL_TASK_END, Chunk, StepInfo
from ocljax.streams.stream import KINDS, Stream, StreamConfig


def build(cfg: StreamConfig, ds: Dataset, seeds: list[int]) -> Stream:
    """The stream ``cfg.kind`` over ``ds`` for one member per entry of ``seeds``.

    With ``cfg.iid`` the same samples (and number of steps) arrive shuffled across tasks: the
    joint upper bound, evaluated on the same per-task test sets. A malformed ``ds`` (labels
    out of range, shapes that disagree; see ``ocljax.data.validate``) raises ``DataError``
    here rather than giving a misleading stream.
    """
    validate(ds)
    if len(seeds) == 0:
        raise ConfigError("a stream needs at least one member: seeds is empty")
    if cfg.kind == "permuted":
        return permuted.build(cfg, ds, seeds)
    if cfg.kind == "rotated":
        return rotated.build(cfg, ds, seeds)
    return split.build(cfg, ds, seeds)


__all__ = [
    "EVAL_CONTINUAL", "EVAL_NONE", "EVAL_TASK_END", "KINDS", "Chunk", "StepInfo", "Stream",
    "StreamConfig", "build",
]
