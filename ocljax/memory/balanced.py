"""Class-balanced memory: GDumb's greedy sampler.

Prabhu, Torr & Dokania 2020, "GDumb: A Simple Approach that Questions Our Progress in Continual
Learning" (ECCV 2020), Sec. 3 "Sampler": while the memory has free rows every offered item is
stored; once it is full, an item of class ``y`` is stored only if ``y`` holds fewer than
``capacity / |classes seen so far|`` rows (the classes seen include ``y``), and it then replaces
a uniformly random row of the class that currently holds the most rows. Over a long enough
stream the class counts end within one row of each other, whatever the class frequencies.

Pure ``init / add / sample`` functions over an explicit state, mirroring
``ocljax.memory.reservoir``. The items of a batch are processed in order, exactly as the
sequential sampler would process them: a ``lax.scan`` over the batch decides each item's row
from the labels alone (so the scan carries ``[capacity]`` labels, never the stored rows), then
one scatter writes the rows (when two items of a batch land on the same row, the later one
wins, as it would sequentially).

Details the paper leaves open: ties for the largest class go to the lowest class index; the
random row of that class is its ``r``-th row in row order, ``r ~ U{0, ..., count - 1}`` drawn
from ``jax.random.split(key, B)[b]`` for item ``b`` (so a reference can replay the draws).
Labels must lie in ``[0, num_classes)``. Rows fill ``0, 1, ...`` in order while the memory is
not full, so the filled rows are always ``[0, size)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax.memory.reservoir import sample_indices
from ocljax.types import Array, PyTree


class BalancedState(NamedTuple):
    data: PyTree  # leaves [capacity, ...]
    labels: Array  # [capacity] int32, class of each row; -1 for empty rows
    counts: Array  # [num_classes] int32, rows held by each class
    seen: Array  # [num_classes] bool, classes offered so far (valid items only)
    n_seen: Array  # [] int32, valid items offered so far


def init(capacity: int, example: PyTree, num_classes: int) -> BalancedState:
    """An empty memory of ``capacity`` rows shaped like one row of each leaf of ``example``.

    example: leaves [B, ...]; only shapes and dtypes are used.
    """
    if capacity < 1:
        raise ValueError(f"balanced memory capacity must be >= 1, got {capacity}")
    if num_classes < 1:
        raise ValueError(f"balanced memory needs num_classes >= 1, got {num_classes}")
    data = jax.tree.map(lambda a: jnp.zeros((capacity, *a.shape[1:]), a.dtype), example)
    return BalancedState(
        data=data,
        labels=jnp.full((capacity,), -1, jnp.int32),
        counts=jnp.zeros((num_classes,), jnp.int32),
        seen=jnp.zeros((num_classes,), bool),
        n_seen=jnp.zeros((), jnp.int32),
    )


def capacity(state: BalancedState) -> int:
    """Static number of rows."""
    return state.labels.shape[0]


def size(state: BalancedState) -> Array:
    """Number of filled rows (they are rows ``[0, size)``): [] int32."""
    return state.counts.sum()


def class_counts(state: BalancedState) -> Array:
    """Rows held by each class: [num_classes] int32."""
    return state.counts


def slots(state: BalancedState, labels: Array, key: Array, valid: Array):
    """Row each incoming item is written to, or ``capacity`` (not stored), and the new
    bookkeeping: ``(slot [B] int32, labels [cap], counts [C], seen [C])``.

    labels: [B] int32 classes of the incoming items; valid: [B] bool, items that take part.
    """
    cap = capacity(state)

    def one(carry, item):
        row_labels, counts, seen = carry
        y, k, v = item
        seen = seen | ((jnp.arange(seen.shape[0]) == y) & v)
        n_classes = seen.sum(dtype=jnp.int32)
        filled = counts.sum()
        full = filled >= cap
        admit = counts[y] * n_classes < cap  # count < cap / n_classes, in exact integers
        largest = jnp.argmax(counts)  # first (lowest) class index among ties
        r = jax.random.randint(k, (), 0, jnp.maximum(counts[largest], 1))
        is_largest = row_labels == largest
        victim = jnp.argmax(is_largest & (jnp.cumsum(is_largest) == r + 1))  # its r-th row
        store = v & (~full | admit)
        evict = store & full
        slot = jnp.where(store, jnp.where(full, victim, filled), cap)
        counts = counts.at[largest].add(-evict.astype(jnp.int32))
        counts = counts.at[y].add(store.astype(jnp.int32))
        row_labels = row_labels.at[slot].set(y, mode="drop")
        return (row_labels, counts, seen), slot

    keys = jax.random.split(key, labels.shape[0])
    (row_labels, counts, seen), slot = jax.lax.scan(
        one, (state.labels, state.counts, state.seen), (labels.astype(jnp.int32), keys, valid)
    )
    return slot, row_labels, counts, seen


def add(state: BalancedState, items: PyTree, key: Array, valid: Array | None = None,
        labels: Array | None = None) -> BalancedState:
    """Offer a batch of items (leaves [B, ...]) in order; returns the new state.

    ``labels`` [B] (the classes the sampler balances) default to ``items["y"]``.
    """
    if labels is None:
        labels = items["y"]
    batch = labels.shape[0]
    if valid is None:
        valid = jnp.ones((batch,), bool)
    cap = capacity(state)
    slot, row_labels, counts, seen = slots(state, labels, key, valid)
    # Sequential semantics: if two items of the batch take the same row, the later one wins.
    b = jnp.arange(batch)
    overwritten = ((slot[:, None] == slot[None, :]) & (b[None, :] > b[:, None])).any(axis=1)
    slot = jnp.where(overwritten, cap, slot)
    data = jax.tree.map(lambda buf, new: buf.at[slot].set(new, mode="drop"), state.data, items)
    return BalancedState(data=data, labels=row_labels, counts=counts, seen=seen,
                         n_seen=state.n_seen + valid.sum(dtype=jnp.int32))


def sample(state: BalancedState, key: Array, n: int) -> tuple[PyTree, Array]:
    """Draw ``n`` filled rows uniformly without replacement; returns ``(rows, mask [n] bool)``
    (masked-out rows, when fewer than ``n`` are filled, are copies of row 0)."""
    idx, mask = sample_indices(key, size(state), n)
    return jax.tree.map(lambda buf: buf[idx], state.data), mask
