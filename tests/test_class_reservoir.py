"""The class-balanced reservoir (CoPE's memory): every class holds min(offered, quota) rows,
each class's rows are a uniform sample of its own stream (through quota cuts), and reads pick
a class uniformly before a row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocljax.memory import class_reservoir as cr


def offer(state, ids, labels, key):
    items = {"id": jnp.asarray(ids, jnp.int32), "y": jnp.asarray(labels, jnp.int32)}
    return cr.add(state, items, key)


def empty(capacity, num_classes, batch=1):
    example = {"id": jnp.zeros((batch,), jnp.int32), "y": jnp.zeros((batch,), jnp.int32)}
    return cr.init(capacity, example, num_classes)


def test_each_class_holds_min_of_offered_and_quota_and_rows_match_their_labels():
    rng = np.random.default_rng(0)
    num_classes, cap = 5, 12
    state = empty(cap, num_classes, batch=4)
    offered = np.zeros(num_classes, int)
    # class 0 floods the stream; classes arrive one by one; class 4 stays rare
    labels = np.concatenate([np.zeros(16), rng.choice([0, 1], 12), rng.choice([0, 1, 2], 12),
                             rng.choice([0, 3], 12), [4, 0, 0, 0]]).astype(int)
    add = jax.jit(cr.add)
    for step, start in enumerate(range(0, len(labels), 4)):
        y = labels[start:start + 4]
        items = {"id": jnp.arange(start, start + 4, dtype=jnp.int32), "y": jnp.asarray(y)}
        state = add(state, items, jax.random.PRNGKey(step))
        np.add.at(offered, y, 1)
        n_seen = (offered > 0).sum()
        quota = cap // n_seen
        assert int(cr.quota(state)) == quota
        np.testing.assert_array_equal(cr.class_counts(state), np.minimum(offered, quota))
        row_labels = np.asarray(state.labels)
        np.testing.assert_array_equal(np.bincount(row_labels[row_labels >= 0],
                                                  minlength=num_classes), state.counts)
        filled = row_labels >= 0
        stored_ids = np.asarray(state.data["id"])[filled]
        np.testing.assert_array_equal(labels[stored_ids], row_labels[filled])
        np.testing.assert_array_equal(np.asarray(state.data["y"])[filled], row_labels[filled])
        assert len(set(stored_ids.tolist())) == filled.sum()  # no item stored twice


def test_each_class_keeps_a_uniform_sample_of_its_own_stream_through_a_quota_cut():
    """Ten class-0 items fill a 4-row memory, then six class-1 items arrive and the quota
    drops to 2: each class-0 item ends stored with probability 2/10, each class-1 item with
    2/6 (reservoir sampling per class). Keeping the first rows, or evicting from the largest
    class as GDumb does, fails this."""
    ids = np.arange(16)
    labels = np.array([0] * 10 + [1] * 6)

    def run(key):
        state = empty(4, 2, batch=2)
        for i, k in enumerate(jax.random.split(key, 8)):
            state = offer(state, ids[2 * i:2 * i + 2], labels[2 * i:2 * i + 2], k)
        stored = jnp.zeros(16, bool).at[state.data["id"]].set(state.labels >= 0)
        return stored, state.counts

    n = 4000
    stored, counts = jax.jit(jax.vmap(run))(jax.random.split(jax.random.PRNGKey(3), n))
    np.testing.assert_array_equal(np.asarray(counts), np.tile([2, 2], (n, 1)))
    freq = np.asarray(stored).mean(0)
    np.testing.assert_allclose(freq[:10], 0.2, atol=0.03)
    np.testing.assert_allclose(freq[10:], 1 / 3, atol=0.035)


def test_reads_pick_a_class_uniformly_then_a_row():
    """Eight rows of class 0 and two of class 1 (quota 8); four draws. Uniform over rows would
    give 0.8 class-1 rows on average; a class-first draw gives min(2, Binomial(4, 1/2)), mean
    1.625."""
    state = empty(16, 2, batch=10)
    state = offer(state, np.arange(10), [0] * 8 + [1] * 2, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(state.counts, [8, 2])

    def draw(key):
        idx, mask = cr.sample_indices(state, key, 4)
        return idx, mask, (state.labels[idx] == 1).sum()

    idx, mask, ones = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.PRNGKey(1), 4000))
    assert np.asarray(mask).all()
    assert all(len(set(row.tolist())) == 4 for row in np.asarray(idx))  # without replacement
    np.testing.assert_allclose(np.asarray(ones).mean(), 1.625, atol=0.05)
    assert np.asarray(ones).max() == 2


def test_reads_from_a_small_memory_are_masked():
    state = empty(10, 3, batch=2)
    state = offer(state, [0, 1], [2, 0], jax.random.PRNGKey(0))
    idx, mask = cr.sample_indices(state, jax.random.PRNGKey(1), 5)
    np.testing.assert_array_equal(mask, [True, True, False, False, False])
    assert sorted(np.asarray(state.data["id"])[np.asarray(idx)[:2]].tolist()) == [0, 1]
    rows, mask2 = cr.sample(state, jax.random.PRNGKey(1), 5)
    np.testing.assert_array_equal(mask2, mask)
    assert rows["id"].shape == (5,)


def test_invalid_items_are_not_offered():
    state = empty(4, 2, batch=3)
    items = {"id": jnp.arange(3, dtype=jnp.int32), "y": jnp.asarray([0, 1, 1])}
    state = cr.add(state, items, jax.random.PRNGKey(0), valid=jnp.asarray([True, False, True]))
    np.testing.assert_array_equal(state.offered, [1, 1])
    np.testing.assert_array_equal(state.counts, [1, 1])


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        empty(0, 2)
    with pytest.raises(ValueError, match="num_classes"):
        empty(4, 0)
