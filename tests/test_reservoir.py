import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocljax.memory import reservoir


def fill(key, n_items=50, batch=5, cap=10):
    state = reservoir.init(cap, {"id": jnp.zeros((batch,), jnp.int32)})
    for b, k in enumerate(jax.random.split(key, n_items // batch)):
        ids = jnp.arange(b * batch, (b + 1) * batch)
        state = reservoir.add(state, {"id": ids}, k)
    return state


def test_inclusion_is_uniform_over_many_vmapped_seeds():
    n_items, cap, trials = 50, 10, 4000
    states = jax.jit(jax.vmap(fill))(jax.random.split(jax.random.PRNGKey(0), trials))
    ids = np.asarray(states.data["id"])  # [trials, cap]
    # no item is stored twice and the buffer is full
    assert all(len(set(row)) == cap for row in ids)
    freq = np.bincount(ids.ravel(), minlength=n_items) / trials
    p = cap / n_items
    sd = np.sqrt(p * (1 - p) / trials)
    assert np.abs(freq - p).max() < 5 * sd, freq
    # early and late items are equally likely (a biased write policy fails this)
    assert abs(freq[:25].mean() - freq[25:].mean()) < 3 * sd


def test_vectorised_add_matches_sequential_algorithm_r():
    cap, batch = 4, 6
    key = jax.random.PRNGKey(3)
    state = reservoir.init(cap, {"id": jnp.zeros((batch,), jnp.int32)})
    ref = [None] * cap
    seen = 0
    for b, k in enumerate(jax.random.split(key, 5)):
        ids = np.arange(b * batch, (b + 1) * batch)
        valid = np.array([True, True, False, True, True, True])
        # the draws the vectorised version makes, replayed one item at a time
        pos = seen + np.cumsum(valid) - 1
        draws = np.asarray(jax.random.randint(k, (batch,), 0, jnp.asarray(pos) + 1))
        for i in range(batch):
            if not valid[i]:
                continue
            if seen < cap:
                ref[seen] = ids[i]
            elif draws[i] < cap:
                ref[draws[i]] = ids[i]
            seen += 1
        state = reservoir.add(state, {"id": jnp.asarray(ids)}, k, jnp.asarray(valid))
        assert list(np.asarray(state.data["id"])[: min(seen, cap)]) == ref[: min(seen, cap)]
    assert int(state.n_seen) == seen


@pytest.mark.parametrize("n, population", [(5, 20), (40, 160)])
def test_sample_indices_distinct_in_range_and_uniform(n, population):
    keys = jax.random.split(jax.random.PRNGKey(1), 3000)
    idx, mask = jax.vmap(lambda k: reservoir.sample_indices(k, jnp.int32(population), n))(keys)
    idx = np.asarray(idx)
    assert np.asarray(mask).all()
    assert all(len(set(r)) == n for r in idx)
    assert idx.min() >= 0 and idx.max() < population
    freq = np.bincount(idx.ravel(), minlength=population) / 3000
    assert np.abs(freq - n / population).max() < 0.05
    # a population smaller than n: all of it, once each, the rest masked
    idx, mask = reservoir.sample_indices(jax.random.PRNGKey(0), jnp.int32(3), n)
    assert sorted(np.asarray(idx)[np.asarray(mask)]) == [0, 1, 2]
    _, mask = reservoir.sample_indices(jax.random.PRNGKey(0), jnp.int32(0), n)
    assert not np.asarray(mask).any()


@pytest.mark.parametrize("n", [1, 7, 64])
def test_sample_indices_follows_floyds_sequential_rule(n):
    # the parallel resolution of duplicates picks what Floyd's loop picks from the same draws
    for seed in range(40):
        key = jax.random.PRNGKey(seed)
        population = [0, 3, n, n + 5, 4 * n, 1000][seed % 6]
        keys = jax.random.split(key, n)
        picked = []
        for k in range(n):
            j = population - n + k
            draw = int(jax.random.randint(keys[k], (), 0, max(j, 0) + 1))
            if j >= 0:
                picked.append(j if draw in picked else draw)
        idx, mask = reservoir.sample_indices(key, jnp.int32(population), n)
        assert list(np.asarray(idx)[np.asarray(mask)]) == picked
