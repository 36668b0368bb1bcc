"""GDumb's greedy class-balanced memory (``ocljax.memory.balanced``)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocljax.memory import balanced

add = jax.jit(balanced.add)


def offer(state, ids, labels, key, valid=None):
    items = {"id": jnp.asarray(ids, jnp.int32), "y": jnp.asarray(labels, jnp.int32)}
    if valid is None:
        valid = np.ones(len(ids), bool)
    return add(state, items, key, jnp.asarray(valid))


def draws(key, batch, cap):
    """``table[b, c - 1]``: the row index item ``b`` of a batch offered with ``key`` draws
    when the largest class holds ``c`` rows (the memory's draws, replayed)."""
    return np.asarray(_draws(key, batch, cap))


@partial(jax.jit, static_argnums=(1, 2))
def _draws(key, batch, cap):
    keys = jax.random.split(key, batch)
    counts = jnp.arange(1, cap + 1)
    return jax.vmap(lambda k: jax.vmap(lambda c: jax.random.randint(k, (), 0, c))(counts))(keys)


def empty(cap, num_classes, batch):
    example = {"id": jnp.zeros((batch,), jnp.int32), "y": jnp.zeros((batch,), jnp.int32)}
    return balanced.init(cap, example, num_classes)


class Reference:
    """The sampler one item at a time in plain Python (rows as a list of (id, label))."""

    def __init__(self, cap, num_classes):
        self.cap, self.rows, self.seen = cap, [], set()
        self.num_classes = num_classes

    def counts(self):
        return [sum(lab == c for _, lab in self.rows) for c in range(self.num_classes)]

    def offer(self, item_id, label, r_of):
        """``r_of(count)``: the index, among the largest class's rows, of the row replaced."""
        self.seen.add(label)
        counts = self.counts()
        if len(self.rows) < self.cap:
            self.rows.append((item_id, label))
            return None
        if counts[label] >= self.cap / len(self.seen):
            return None
        largest = max(range(self.num_classes), key=lambda c: (counts[c], -c))
        victims = [i for i, (_, lab) in enumerate(self.rows) if lab == largest]
        row = victims[r_of(counts[largest])]
        self.rows[row] = (item_id, label)
        return largest


def test_skewed_stream_ends_balanced():
    cap, num_classes, batch = 20, 4, 10
    rng = np.random.default_rng(0)
    # 85% class 0, the rest split over 1..3; class 0 alone fills the memory first
    labels = np.concatenate([np.zeros(40, int),
                             rng.choice(4, size=360, p=[0.85, 0.05, 0.05, 0.05])])
    assert (np.bincount(labels[40:], minlength=4)[1:] > cap // num_classes + 1).all()
    state = empty(cap, num_classes, batch)
    for b, k in enumerate(jax.random.split(jax.random.PRNGKey(0), len(labels) // batch)):
        sl = slice(b * batch, (b + 1) * batch)
        state = offer(state, np.arange(len(labels))[sl], labels[sl], k)
    counts = np.asarray(balanced.class_counts(state))
    assert counts.sum() == cap == int(balanced.size(state))
    assert counts.max() - counts.min() <= 1, counts
    # the stored labels agree with the bookkeeping
    np.testing.assert_array_equal(np.bincount(np.asarray(state.data["y"]), minlength=4), counts)


def test_every_stored_row_is_an_offered_item():
    cap, num_classes, batch = 12, 3, 5
    rng = np.random.default_rng(1)
    n = 80
    labels = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    valid = rng.random(n) < 0.8
    state = empty(cap, num_classes, batch)
    for b, k in enumerate(jax.random.split(jax.random.PRNGKey(1), n // batch)):
        sl = slice(b * batch, (b + 1) * batch)
        state = offer(state, np.arange(n)[sl], labels[sl], k, valid[sl])
        size = int(balanced.size(state))
        ids = np.asarray(state.data["id"])[:size]
        ys = np.asarray(state.data["y"])[:size]
        assert len(set(ids.tolist())) == size  # no item twice
        assert valid[ids].all()  # only valid items are stored
        np.testing.assert_array_equal(ys, labels[ids])  # each row is whole: x matches y
        np.testing.assert_array_equal(np.asarray(state.labels)[:size], ys)
        assert (np.asarray(state.labels)[size:] == -1).all()
    assert int(state.n_seen) == valid.sum()


@pytest.mark.parametrize("cap,num_classes", [(7, 3), (12, 4), (2, 4)])
def test_matches_sequential_reference(cap, num_classes):
    """Counts after every batch and the exact rows match a one-item-at-a-time reference that
    replays the memory's draws (item b of a batch draws from ``split(key, B)[b]``)."""
    batch, n = 5, 90
    rng = np.random.default_rng(cap)
    labels = rng.integers(0, num_classes, size=n)
    labels[: n // 3] = 0  # a skewed start
    valid = rng.random(n) < 0.85
    state, ref = empty(cap, num_classes, batch), Reference(cap, num_classes)
    for b, k in enumerate(jax.random.split(jax.random.PRNGKey(cap), n // batch)):
        sl = slice(b * batch, (b + 1) * batch)
        table = draws(k, batch, cap)
        for i in np.flatnonzero(valid[sl]):
            item = b * batch + i
            ref.offer(item, int(labels[item]), lambda count, i=i, t=table: int(t[i, count - 1]))
        state = offer(state, np.arange(n)[sl], labels[sl], k, valid[sl])
        np.testing.assert_array_equal(np.asarray(balanced.class_counts(state)), ref.counts())
        size = len(ref.rows)
        assert int(balanced.size(state)) == size
        np.testing.assert_array_equal(np.asarray(state.data["id"])[:size],
                                      [i for i, _ in ref.rows])


def test_evicted_row_comes_from_the_largest_class():
    cap, num_classes = 9, 4
    rng = np.random.default_rng(5)
    labels = np.concatenate([np.zeros(15, int), rng.integers(0, num_classes, size=100)])
    state = empty(cap, num_classes, 1)
    evictions = 0
    for t, k in enumerate(jax.random.split(jax.random.PRNGKey(5), len(labels))):
        before_counts = np.asarray(balanced.class_counts(state))
        before = np.asarray(state.data["id"]).copy()
        before_y = np.asarray(state.data["y"]).copy()
        full = before_counts.sum() == cap
        state = offer(state, [t], [labels[t]], k)
        changed = np.flatnonzero(np.asarray(state.data["id"]) != before)
        if full and len(changed):
            assert len(changed) == 1
            evictions += 1
            old = before_y[changed[0]]
            assert before_counts[old] == before_counts.max(), (before_counts, old)
            seen = len(set(labels[: t + 1].tolist()))
            assert before_counts[labels[t]] < cap / seen  # admitted only below its share
    assert evictions >= 5


def test_sample_draws_filled_rows_only():
    state = empty(10, 2, 3)
    state = offer(state, [4, 5, 6], [0, 1, 1], jax.random.PRNGKey(0))
    rows, mask = jax.jit(balanced.sample, static_argnums=2)(state, jax.random.PRNGKey(1), 5)
    assert np.asarray(mask).sum() == 3
    assert sorted(np.asarray(rows["id"])[np.asarray(mask)].tolist()) == [4, 5, 6]


def test_add_under_vmap_matches_single_runs():
    state = empty(4, 2, 3)
    ids, ys = jnp.arange(3), jnp.array([0, 1, 0])
    keys = jax.random.split(jax.random.PRNGKey(2), 2)

    def run(key):
        s = state
        for j in range(3):
            s = balanced.add(s, {"id": ids + 3 * j, "y": ys}, jax.random.fold_in(key, j))
        return s

    batched = jax.jit(jax.vmap(run))(keys)
    for m in range(2):
        single = jax.jit(run)(keys[m])
        jax.tree.map(lambda a, b, m=m: np.testing.assert_array_equal(a[m], b), batched, single)
