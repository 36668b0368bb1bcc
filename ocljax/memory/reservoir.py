"""Reservoir sampling buffer (Vitter 1985, "Random sampling with a reservoir", Algorithm R).

After ``n`` items have been offered, every one of them is in the buffer with probability
``capacity / n``. Pure ``init / add / sample`` over an explicit state, vectorised over the
incoming batch: item ``b`` of a batch is processed exactly as the sequential algorithm would
process it (a later item that draws the same slot overwrites an earlier one).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax.types import Array, PyTree


class ReservoirState(NamedTuple):
    data: PyTree  # leaves [capacity, ...]
    n_seen: Array  # [] int32, items offered so far


def init(capacity: int, example: PyTree) -> ReservoirState:
    """An empty buffer of ``capacity`` rows shaped like one row of each leaf of ``example``.

    example: leaves [B, ...]; only shapes and dtypes are used.
    """
    if capacity < 1:
        raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
    data = jax.tree.map(lambda a: jnp.zeros((capacity, *a.shape[1:]), a.dtype), example)
    return ReservoirState(data=data, n_seen=jnp.zeros((), jnp.int32))


def capacity(state: ReservoirState) -> int:
    """Static number of rows."""
    return jax.tree.leaves(state.data)[0].shape[0]


def size(state: ReservoirState) -> Array:
    """Number of filled rows, ``min(n_seen, capacity)``: [] int32."""
    return jnp.minimum(state.n_seen, capacity(state))


def slots(n_seen: Array, cap: int, key: Array, valid: Array) -> Array:
    """Row each incoming item is written to, or ``cap`` (dropped): [B] int32.

    valid: [B] bool, items that take part (invalid ones are neither counted nor written).
    """
    position = n_seen + jnp.cumsum(valid.astype(jnp.int32)) - 1  # index of item in the stream
    draw = jax.random.randint(key, valid.shape, 0, position + 1)
    slot = jnp.where(position < cap, position, jnp.where(draw < cap, draw, cap))
    slot = jnp.where(valid, slot, cap)
    # Sequential semantics: if two items of the batch pick the same row, the later one wins.
    b = jnp.arange(valid.shape[0])
    overwritten = (slot[:, None] == slot[None, :]) & (b[None, :] > b[:, None])
    return jnp.where(overwritten.any(axis=1), cap, slot)


def add(state: ReservoirState, items: PyTree, key: Array, valid: Array | None = None):
    """Offer a batch of items (leaves [B, ...]) to the reservoir; returns the new state."""
    batch = jax.tree.leaves(items)[0].shape[0]
    if valid is None:
        valid = jnp.ones((batch,), bool)
    cap = capacity(state)
    slot = slots(state.n_seen, cap, key, valid)
    data = jax.tree.map(lambda buf, new: buf.at[slot].set(new, mode="drop"), state.data, items)
    return ReservoirState(data=data, n_seen=state.n_seen + valid.sum(dtype=jnp.int32))


def sample_indices(key: Array, population: Array, n: int) -> tuple[Array, Array]:
    """``min(n, population)`` distinct indices drawn uniformly from ``range(population)``.

    Floyd's algorithm (Bentley & Floyd 1987): O(n^2) work for a static ``n``, independent of
    the population size, so it is cheap inside a scan. Returns ``(indices [n] int32,
    mask [n] bool)``; masked-out entries (when ``population < n``) hold index 0.
    """
    # Draw k is randint(split(key, n)[k], 0, max(j_k, 0) + 1), all n in one vmapped call.
    # Floyd's rule keeps draw k unless it was picked before, when it takes j_k instead. That
    # sequential rule is resolved in parallel here (the same picks, tested against the loop;
    # a loop of n steps, or n unrolled random draws, made SCR's compiled step many times
    # larger): draw k is a duplicate iff an earlier live draw equals it (if that one was
    # itself replaced, its value was already picked), or the earlier i with j_i == draw k was
    # replaced. The second case follows a chain of strictly decreasing i, which pointer
    # jumping resolves in ceil(log2 n) rounds.
    order = jnp.arange(n, dtype=jnp.int32)
    j = population - n + order
    draws = jax.vmap(lambda k, hi: jax.random.randint(k, (), 0, hi))(
        jax.random.split(key, n), jnp.maximum(j, 0) + 1)
    live = j >= 0  # steps with j < 0 (population < n) pick nothing
    earlier = order[None, :] < order[:, None]  # [k, i]: i before k
    dup = jnp.any((draws[None, :] == draws[:, None]) & earlier & live[None, :], axis=1)
    ptr = draws - (population - n)  # the step i whose j_i equals draw k
    ptr = jnp.where((ptr >= 0) & (ptr < order), ptr, -1)
    for _ in range(max(1, (n - 1).bit_length())):
        linked = ptr >= 0
        at = jnp.maximum(ptr, 0)
        dup = dup | (linked & dup[at])
        ptr = jnp.where(linked, ptr[at], -1)
    picked = jnp.where(live, jnp.where(dup, j, draws), -1)
    mask = picked >= 0
    return jnp.maximum(picked, 0), mask


def subset_indices(key: Array, usable: Array, n: int) -> tuple[Array, Array]:
    """``n`` distinct rows drawn uniformly from those where ``usable`` [M] (top-k of random
    keys, O(M)): ``(indices [n], mask [n])``, masked where fewer than ``n`` rows are usable.
    For draws from an arbitrary set of rows; ``sample_indices`` draws from a prefix in O(n^2)
    independent of M."""
    score = jnp.where(usable, jax.random.uniform(key, usable.shape), -1.0)
    _, idx = jax.lax.top_k(score, n)
    return idx, jnp.arange(n) < usable.sum()


def sample(state: ReservoirState, key: Array, n: int) -> tuple[PyTree, Array]:
    """Draw ``n`` rows without replacement; returns ``(rows, mask [n] bool)``."""
    idx, mask = sample_indices(key, size(state), n)
    return jax.tree.map(lambda buf: buf[idx], state.data), mask
