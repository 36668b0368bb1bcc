"""Class-balanced reservoir memory: one reservoir per class, with equal, shrinking quotas.

The memory of CoPE (De Lange & Tuytelaars 2021, "Continual Prototype Evolution: Learning Online
from Non-Stationary Data Streams", ICCV 2021; its "class-balanced replay" with dynamic memory,
the authors' ``dyn_mem`` default): a memory of ``capacity`` rows gives each class seen so far
the same quota, ``capacity // (classes seen)``; within its quota each class keeps a uniform
random sample of *its own* stream (reservoir sampling per class, Vitter 1985). When a new class
appears, every class cuts its rows to the smaller quota by keeping a uniformly random subset.
Whatever the class frequencies, every class then holds ``min(offered, quota)`` rows, each a
uniform sample of that class's samples. (GDumb's greedy sampler, ``ocljax.memory.balanced``,
balances too but keeps each class's *first* samples.)

Retrieval (``sample``) is the authors' class-balanced read: each of the ``n`` draws first picks
a class uniformly among the classes that still have rows not yet drawn, then one of those rows
uniformly, so rare classes are replayed as often as frequent ones.

Pure ``init / add / sample`` functions over an explicit state, like ``ocljax.memory.reservoir``.
Rows of all classes share one ``[capacity]`` array (label ``-1`` marks a free row); which row of
a class a reservoir replacement takes is the ``r``-th row of that class in row order, one
consistent numbering, so each stored row is equally likely to go.

Here every class is a proper reservoir: each of its items is stored with the same chance.
The authors' code (``model/prototypical/mem_scheme.py``, ``update_reservoir_queue``) is not
quite one, and these are the deviations from it:

- While a class is below its quota, the code appends the whole batch and keeps the newest
  ``quota`` rows (first in, first out), so a batch that crosses the quota drops the class's
  oldest rows; here the rows beyond the quota go through the reservoir draw.
- A class created by a batch starts with the old per-class quota, and the cut to the new
  quota follows the write; here the batch's classes are counted first and the cut comes
  before its rows are written.
- The code adds the whole batch to a class's count before drawing its rows' slots; here rows
  are offered one at a time, each counting itself.

With the authors' split-MNIST settings (200 rows per class, batches of 10) these move a few
rows per class; on small memories with large batches they matter more (a review measured
per-item storage chances of 0.00-0.84 in the code against 0.48-0.52 here, capacity 20).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax.types import Array, PyTree

__all__ = ["ClassReservoirState", "add", "capacity", "class_counts", "init", "quota", "sample",
           "sample_indices", "size"]


class ClassReservoirState(NamedTuple):
    data: PyTree  # leaves [capacity, ...]
    labels: Array  # [capacity] int32, class of each row; -1 for free rows
    counts: Array  # [num_classes] int32, rows held by each class
    offered: Array  # [num_classes] int32, valid items of each class offered so far


def init(capacity: int, example: PyTree, num_classes: int) -> ClassReservoirState:
    """An empty memory of ``capacity`` rows shaped like one row of each leaf of ``example``
    (leaves [B, ...]; only shapes and dtypes are used) for labels in ``[0, num_classes)``."""
    if capacity < 1:
        raise ValueError(f"class reservoir capacity must be >= 1, got {capacity}")
    if num_classes < 1:
        raise ValueError(f"class reservoir needs num_classes >= 1, got {num_classes}")
    data = jax.tree.map(lambda a: jnp.zeros((capacity, *a.shape[1:]), a.dtype), example)
    return ClassReservoirState(
        data=data,
        labels=jnp.full((capacity,), -1, jnp.int32),
        counts=jnp.zeros((num_classes,), jnp.int32),
        offered=jnp.zeros((num_classes,), jnp.int32),
    )


def capacity(state: ClassReservoirState) -> int:
    """Static number of rows."""
    return state.labels.shape[0]


def size(state: ClassReservoirState) -> Array:
    """Number of filled rows: [] int32 (not necessarily a prefix of the rows)."""
    return state.counts.sum()


def class_counts(state: ClassReservoirState) -> Array:
    """Rows held by each class: [num_classes] int32."""
    return state.counts


def quota(state: ClassReservoirState) -> Array:
    """Rows each class may hold: ``capacity // (classes offered so far)`` ([] int32;
    ``capacity`` before any class)."""
    return capacity(state) // jnp.maximum((state.offered > 0).sum(dtype=jnp.int32), 1)


def _cut(labels: Array, counts: Array, key: Array, limit: Array) -> tuple[Array, Array]:
    """Free rows so that every class keeps a uniformly random subset of at most ``limit`` of
    its rows: ``(labels, counts)``."""
    cap = labels.shape[0]
    u = jax.random.uniform(key, (cap,))
    group = jnp.where(labels >= 0, labels, counts.shape[0])  # free rows sort last
    order = jnp.lexsort((u, group))  # by class, at random within it
    sorted_group = group[order]
    rank_sorted = jnp.arange(cap) - jnp.searchsorted(sorted_group, sorted_group, side="left")
    rank = jnp.zeros((cap,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    labels = jnp.where((labels >= 0) & (rank >= limit), -1, labels)
    return labels, jnp.minimum(counts, limit)


def add(state: ClassReservoirState, items: PyTree, key: Array, valid: Array | None = None,
        labels: Array | None = None) -> ClassReservoirState:
    """Offer a batch of items (leaves [B, ...]; classes ``labels`` [B], default ``items["y"]``)
    in order; returns the new state. A batch that brings new classes first cuts every class to
    the new quota (module docstring)."""
    if labels is None:
        labels = items["y"]
    labels = labels.astype(jnp.int32)
    batch = labels.shape[0]
    if valid is None:
        valid = jnp.ones((batch,), bool)
    cap, num_classes = capacity(state), state.counts.shape[0]
    k_cut, k_items = jax.random.split(key)
    offered_after = state.offered + jnp.zeros((num_classes,), jnp.int32).at[labels].add(
        valid.astype(jnp.int32))
    n_before = (state.offered > 0).sum(dtype=jnp.int32)
    n_after = (offered_after > 0).sum(dtype=jnp.int32)
    limit = cap // jnp.maximum(n_after, 1)
    row_labels, counts = jax.lax.cond(
        n_after > n_before, lambda: _cut(state.labels, state.counts, k_cut, limit),
        lambda: (state.labels, state.counts))

    def one(carry, item):
        row_labels, counts, offered = carry
        y, k, v = item
        offered = offered.at[y].add(v.astype(jnp.int32))
        room = counts[y] < limit  # then a free row exists: sum(counts) < n_after * limit <= cap
        r = jax.random.randint(k, (), 0, jnp.maximum(offered[y], 1))
        is_y = row_labels == y
        victim = jnp.argmax(is_y & (jnp.cumsum(is_y) == r + 1))  # the class's r-th row
        free = jnp.argmax(row_labels < 0)
        store = v & (room | (r < limit))
        slot = jnp.where(store, jnp.where(room, free, victim), cap)
        counts = counts.at[y].add((store & room).astype(jnp.int32))
        row_labels = row_labels.at[slot].set(y, mode="drop")
        return (row_labels, counts, offered), slot

    keys = jax.random.split(k_items, batch)
    (row_labels, counts, offered), slot = jax.lax.scan(
        one, (row_labels, counts, state.offered), (labels, keys, valid))
    # Sequential semantics: if two items of the batch take the same row, the later one wins.
    b = jnp.arange(batch)
    overwritten = ((slot[:, None] == slot[None, :]) & (b[None, :] > b[:, None])).any(axis=1)
    slot = jnp.where(overwritten, cap, slot)
    data = jax.tree.map(lambda buf, new: buf.at[slot].set(new, mode="drop"), state.data, items)
    return ClassReservoirState(data=data, labels=row_labels, counts=counts, offered=offered)


def sample_indices(state: ClassReservoirState, key: Array, n: int) -> tuple[Array, Array]:
    """``n`` distinct filled rows, drawn class-balanced (module docstring): each draw picks a
    class uniformly among those with rows not yet drawn, then one of its undrawn rows uniformly.
    Returns ``(indices [n] int32, mask [n] bool)``; masked-out entries (fewer than ``n`` rows
    stored) hold row 0."""
    cap = capacity(state)

    def one(carry, k):
        taken, left = carry
        k_class, k_row = jax.random.split(k)
        ok = (left > 0).any()
        c = jax.random.categorical(k_class, jnp.where(left > 0, 0.0, -jnp.inf))
        c = jnp.where(ok, c, 0)
        usable = (state.labels == c) & ~taken
        row = jnp.argmax(jnp.where(usable, jax.random.uniform(k_row, (cap,)), -1.0))
        taken = taken.at[row].set(taken[row] | ok)
        left = left.at[c].add(-ok.astype(jnp.int32))
        return (taken, left), (jnp.where(ok, row, 0).astype(jnp.int32), ok)

    _, (idx, mask) = jax.lax.scan(
        one, (jnp.zeros((cap,), bool), state.counts), jax.random.split(key, n))
    return idx, mask


def sample(state: ClassReservoirState, key: Array, n: int) -> tuple[PyTree, Array]:
    """``n`` rows drawn by ``sample_indices``: ``(rows, mask [n] bool)`` (masked-out rows are
    copies of row 0)."""
    idx, mask = sample_indices(state, key, n)
    return jax.tree.map(lambda buf: buf[idx], state.data), mask
