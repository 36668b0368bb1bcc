"""Rotated streams (domain-incremental): every task shows all classes rotated by its own angle.

The "MNIST rotations" benchmark of Lopez-Paz & Ranzato 2017 ("Gradient Episodic Memory for
Continual Learning", NeurIPS, Sec. 5: 20 tasks of 1,000 samples, angles between 0 and 180
degrees). As in the data script released with that paper, task ``k``'s angle is drawn uniformly
in ``[k, k + 1) * max_rotation / n_tasks`` degrees, so the angles grow over the stream, and
images turn counterclockwise about their centre with nearest-neighbour sampling and zero fill
(what PIL's ``Image.rotate`` does by default; ``rotation_source`` matches it pixel for pixel).
Angles are drawn per seed, like the permuted stream's permutations; every task is tested on the
test set (``test_per_task`` images, all when 0) under its rotation (one evaluation view per
task). A rotation is a fixed map of
output pixels to input pixels, so it runs on the device as one gather, like a permutation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ocljax.data.dataset import Dataset
from ocljax.streams import permuted
from ocljax.streams.stream import Stream, StreamConfig, member_rng

ANGLE_SALT = 23


def task_angles(n_tasks: int, max_rotation: float, rng: np.random.Generator) -> np.ndarray:
    """Each task's angle in degrees: task ``k`` uniform in ``[k, k + 1) * max_rotation /
    n_tasks`` (float64 [T])."""
    return (np.arange(n_tasks) + rng.random(n_tasks)) * max_rotation / n_tasks


def rotation_source(shape: tuple[int, ...], angle: float) -> np.ndarray:
    """For each element of a flattened ``shape`` = (H, W[, C]) image rotated counterclockwise by
    ``angle`` degrees about its centre, the flat index of the input element it shows, or
    ``H * W * C`` where it falls outside the input (zero fill): int32 [H * W * C].

    Nearest-neighbour sampling of the input at the inverse-rotated centre of each output pixel
    (the input pixel containing that point), computed as PIL's ``Image.rotate`` computes it:
    the same pixels for every angle and size tried (tests/test_streams.py)."""
    h, w = shape[:2]
    channels = int(np.prod(shape[2:], dtype=int))
    # the inverse map of an output pixel centre (x + 0.5, y + 0.5) to input coordinates, in
    # PIL's arithmetic: cosine and sine rounded to 15 decimals, then 16.16 fixed point, so that
    # quarter turns are exact and ties between two input pixels break as PIL breaks them
    t = -np.deg2rad(angle % 360.0)
    a, b = round(float(np.cos(t)), 15), round(float(np.sin(t)), 15)
    cx, cy = w / 2.0, h / 2.0
    c, f = a * -cx + b * -cy + cx, -b * -cx + a * -cy + cy

    def fixed(v: float) -> int:
        return int(np.floor(v * 65536.0 + 0.5))

    y, x = np.meshgrid(np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64),
                       indexing="ij")
    col = (fixed(c + a * 0.5 + b * 0.5) + x * fixed(a) + y * fixed(b)) >> 16
    row = (fixed(f - b * 0.5 + a * 0.5) + x * fixed(-b) + y * fixed(a)) >> 16
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    pixel = np.where(inside, row * w + col, -1)
    src = pixel[..., None] * channels + np.arange(channels)
    return np.where(pixel[..., None] >= 0, src, h * w * channels).reshape(-1).astype(np.int32)


def transform(aux, views, x):
    """Rotate each sample by its task's angle: ``views`` [B] task ids, ``x`` [B, H, W, C]."""
    flat = x.reshape(x.shape[0], -1)
    padded = jnp.concatenate([flat, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)
    return jnp.take_along_axis(padded, aux["source"][views], axis=1).reshape(x.shape)


def build(cfg: StreamConfig, ds: Dataset, seeds: list[int]) -> Stream:
    """The rotated stream of ``ds`` for members with the given seeds (``aux["angle"]`` [M, T]
    holds each member's angles in degrees; ``member_info`` has them as ``task_angles``, which
    runs write to members.json)."""
    shape = ds.train_x.shape[1:]

    def views(seed: int):
        angles = task_angles(cfg.n_tasks, cfg.max_rotation, member_rng(seed, ANGLE_SALT))
        return {"source": np.stack([rotation_source(shape, a) for a in angles]),
                "angle": angles.astype(np.float32)}

    stream = permuted.view_stream(cfg, ds, seeds, views, transform)
    stream.member_info = [{"task_angles": [round(float(a), 4) for a in angles]}
                          for angles in stream.aux["angle"]]
    return stream
