"""Behaviour that makes ASER that method: KNN Shapley values (Jia et al. 2019, Theorem 1) of
memory rows, class-balanced candidate draws, retrieval of the rows with the best adversarial
Shapley score once the memory is full, and the Shapley-value memory update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocljax.errors import ConfigError
from ocljax.learners import aser, er
from ocljax.memory import reservoir


def ident(x):
    return x


def retrieve(cfg, num_classes, *args):
    """``aser.retrieve`` with identity features, compiled (eager small ops are slow)."""
    return jax.jit(aser.retrieve, static_argnums=(0, 1, 2))(cfg, num_classes, ident, *args)


def write(cfg, num_classes, *args):
    """``aser.write`` with identity features, compiled."""
    return jax.jit(aser.write, static_argnums=(0, 1, 2))(cfg, num_classes, ident, *args)


def sv_reference(eval_f, eval_y, cand_f, cand_y, k):
    """Theorem 1 of Jia et al. 2019 written out: [E, N] for valid rows only."""
    out = np.zeros((len(eval_f), len(cand_f)))
    n = len(cand_f)
    for e in range(len(eval_f)):
        order = np.argsort(((cand_f - eval_f[e]) ** 2).sum(1), kind="stable")
        hit = (cand_y[order] == eval_y[e]).astype(float)
        s = np.zeros(n)
        s[n - 1] = hit[n - 1] / n
        for i in range(n - 2, -1, -1):  # 0-based i is rank i + 1
            s[i] = s[i + 1] + (hit[i] - hit[i + 1]) / k * min(k, i + 1) / (i + 1)
        out[e, order] = s
    return out


def knn_utility(eval_f, eval_y, cand_f, cand_y, k):
    """The KNN classifier's likelihood of the right label, summed over evaluation points."""
    total = 0.0
    for f, y in zip(eval_f, eval_y, strict=True):
        nearest = np.argsort(((cand_f - f) ** 2).sum(1), kind="stable")[:k]
        total += (cand_y[nearest] == y).sum() / k
    return total


def points(seed, n, classes):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, classes, n)


@pytest.mark.parametrize("k", [1, 3, 12])  # Theorem 1 takes K <= N (12 candidates)
def test_knn_shapley_is_theorem_1_and_sums_to_the_knn_utility(k):
    """The recursion matches a loop over sorted candidates, and the values add up to the
    utility of the whole candidate set (the efficiency axiom that makes them Shapley values)."""
    ef, ey = points(0, 5, 3)
    cf, cy = points(1, 12, 3)
    got = np.asarray(aser.knn_shapley(ef, ey, np.ones(5, bool), cf, cy, np.ones(12, bool), k))
    np.testing.assert_allclose(got, sv_reference(ef, ey, cf, cy, k), atol=1e-6)
    np.testing.assert_allclose(got.sum(), knn_utility(ef, ey, cf, cy, k), rtol=1e-5)


def test_knn_shapley_leaves_masked_rows_out():
    ef, ey = points(2, 6, 2)
    cf, cy = points(3, 9, 2)
    em = np.array([1, 0, 1, 1, 0, 1], bool)
    cm = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
    got = np.asarray(aser.knn_shapley(ef, ey, em, cf, cy, cm, 3))
    expected = np.zeros((6, 9))
    expected[np.ix_(em, cm)] = sv_reference(ef[em], ey[em], cf[cm], cy[cm], 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_class_balanced_draw_takes_up_to_n_distinct_usable_rows_per_class_uniformly():
    labels = jnp.asarray([0, 1, 0, 2, 0, 1, 0, 2, 2, 0])
    usable = jnp.asarray([1, 1, 1, 1, 1, 1, 0, 0, 1, 1], bool)  # class 0: rows 0, 2, 4, 9
    draw = jax.jit(aser.class_balanced_indices, static_argnums=(3, 4))
    seen = np.zeros(10)
    for i in range(400):
        idx, mask = map(np.asarray, draw(jax.random.PRNGKey(i), labels, usable, 4, 2))
        picked = idx[mask]
        assert len(set(picked)) == len(picked) and np.all(np.asarray(usable)[picked])
        per_class = np.bincount(np.asarray(labels)[picked], minlength=4)
        np.testing.assert_array_equal(per_class, [2, 2, 2, 0])  # class 3 absent
        np.testing.assert_array_equal(np.asarray(labels)[idx.reshape(4, 2)[:3]],
                                      [[0, 0], [1, 1], [2, 2]])
        seen[picked] += 1
    # class 0 has 4 usable rows for 2 places: each is drawn half the time
    np.testing.assert_allclose(seen[[0, 2, 4, 9]] / 400, 0.5, atol=0.1)
    assert seen[6] == seen[7] == 0 and seen[1] == seen[5] == 400


def full_buffer(x, y):
    example = {"x": jnp.asarray(x[:1]), "y": jnp.asarray(y[:1])}
    buf = reservoir.init(len(y), example)
    return reservoir.add(buf, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, jax.random.PRNGKey(0))


def test_retrieval_is_random_until_the_memory_is_full_then_the_best_scored_candidates():
    cfg = aser.Config(buffer_size=12, replay_batch=3, k=2, n_smp_cls=2.0)
    mx, my = points(4, 12, 3)
    stream = {"x": jnp.asarray(points(5, 4, 3)[0]), "y": jnp.asarray([0, 1, 2, 0])}
    key = jax.random.PRNGKey(7)
    # exactly full (n_seen == capacity): still random, as the code's ``n_seen <= mem_size``
    buf = full_buffer(mx, my)
    rows, mask = retrieve(cfg, 3, buf, key, stream)
    ref_rows, ref_mask = er.replay_rows(buf, jax.random.split(key, 3)[0], 3, stream)
    np.testing.assert_array_equal(rows["x"], ref_rows["x"])
    np.testing.assert_array_equal(mask, ref_mask)
    # one more row seen: ASER scores
    buf = buf._replace(n_seen=buf.n_seen + 1)
    rows, mask = retrieve(cfg, 3, buf, key, stream)
    _, k_cand, k_coop = jax.random.split(key, 3)
    filled = jnp.ones(12, bool)
    cand, cmask = aser.class_balanced_indices(k_cand, buf.data["y"], filled, 3, 2)
    taken = np.zeros(12, bool)
    taken[np.asarray(cand)[np.asarray(cmask)]] = True
    coop, omask = aser.class_balanced_indices(k_coop, buf.data["y"], filled & ~taken, 3, 2)
    cand, coop = np.asarray(cand)[np.asarray(cmask)], np.asarray(coop)[np.asarray(omask)]
    adv = sv_reference(np.asarray(stream["x"]), np.asarray(stream["y"]), mx[cand], my[cand], 2)
    co = sv_reference(mx[coop], my[coop], mx[cand], my[cand], 2)
    score = co.mean(0) - adv.mean(0)  # ASV_mu
    best = cand[np.argsort(-score, kind="stable")[:3]]
    assert bool(mask.all())
    np.testing.assert_array_equal(np.sort(np.asarray(rows["y"])), np.sort(my[best]))
    np.testing.assert_allclose(np.asarray(rows["x"]), mx[best], atol=0)


def test_retrieval_replays_fewer_rows_when_fewer_candidates_exist():
    """Two classes in memory, one row drawn per class: two candidates for three places."""
    cfg = aser.Config(buffer_size=8, replay_batch=3, k=1, n_smp_cls=1.0)
    mx, my = points(6, 8, 2)
    buf = full_buffer(mx, my)._replace(n_seen=jnp.asarray(20, jnp.int32))
    stream = {"x": jnp.asarray(points(7, 2, 2)[0]), "y": jnp.asarray([0, 1])}
    rows, mask = retrieve(cfg, 4, buf, jax.random.PRNGKey(0), stream)
    np.testing.assert_array_equal(mask, [True, True, False])
    assert sorted(np.asarray(rows["y"])[:2].tolist()) == [0, 1]


def write_reference(cfg, num_classes, mx, my, nx, ny, threshold, ev, cand):
    """The authors' ``_update_by_knn_sv`` as loops, given its random draws."""
    share = np.bincount(my, minlength=num_classes) / len(my)
    minority = share[ny] < threshold
    eval_f = np.concatenate([mx[ev], nx[minority]])
    eval_y = np.concatenate([my[ev], ny[minority]])
    cand_f, cand_y = np.concatenate([mx[cand], nx]), np.concatenate([my[cand], ny])
    sv = sv_reference(eval_f, eval_y, cand_f, cand_y, cfg.k).sum(0)
    order = np.argsort(-sv, kind="stable")
    n_buf = len(cand)
    large, small = order[:n_buf], order[n_buf:]
    new_in = [i - n_buf for i in large if i >= n_buf]
    old_out = [cand[i] for i in small if i < n_buf]
    out_x, out_y = mx.copy(), my.copy()
    for i, slot in zip(new_in, old_out, strict=True):
        out_x[slot], out_y[slot] = nx[i], ny[i]
    return out_x, out_y


@pytest.mark.parametrize("seed,cap", [(0, 10), (1, 10), (2, 10), (3, 10), (4, 7), (5, 5)])
def test_memory_update_when_full_is_the_authors_shapley_replacement(seed, cap):
    """Against the authors' update written as loops, given the same draws. Memories of 7 and
    5 rows have fewer than ``int(1.5 * 4)`` = 6 rows outside the evaluation set: every one of
    them is a candidate (the code's ``min(num_retrieve, len(valid))``)."""
    cfg = aser.Config(buffer_size=cap, replay_batch=2, k=2, n_smp_cls=1.5)
    mx, my = points(10 + seed, cap, 3)
    nx, ny = points(20 + seed, 4, 4)  # class 3 is new: a minority class
    buf = full_buffer(mx, my)
    key = jax.random.PRNGKey(seed)
    new = write(cfg, 4, buf, {"x": jnp.asarray(nx), "y": jnp.asarray(ny)}, key,
                jnp.ones(4, bool))
    _, k_threshold, k_eval, k_cand = jax.random.split(key, 4)
    threshold = float(jax.random.uniform(k_threshold, (), maxval=1.0 / 4))
    ev, emask = aser.class_balanced_indices(k_eval, buf.data["y"], jnp.ones(cap, bool), 4, 1)
    taken = np.zeros(cap, bool)
    taken[np.asarray(ev)[np.asarray(emask)]] = True
    cand, cmask = reservoir.subset_indices(k_cand, jnp.asarray(~taken), min(6, cap))
    assert int(cmask.sum()) == min(6, cap - taken.sum())
    ex, ey_ = write_reference(cfg, 4, mx, my, nx, ny, threshold,
                              np.asarray(ev)[np.asarray(emask)],
                              np.asarray(cand)[np.asarray(cmask)])
    np.testing.assert_array_equal(np.asarray(new.data["y"]), ey_)
    np.testing.assert_array_equal(np.asarray(new.data["x"]), ex)
    assert int(new.n_seen) == cap + 4


def test_memory_update_appends_while_there_is_room_and_keeps_rows_outside_the_candidates():
    cfg = aser.Config(buffer_size=6, replay_batch=2, k=1, n_smp_cls=1.0)
    example = {"x": jnp.zeros((1, 3)), "y": jnp.zeros((1,), jnp.int32)}
    buf = reservoir.init(6, example)
    x1, y1 = points(30, 4, 2)
    buf = write(cfg, 2, buf, {"x": jnp.asarray(x1), "y": jnp.asarray(y1)},
                jax.random.PRNGKey(0), jnp.asarray([1, 0, 1, 1], bool))
    np.testing.assert_array_equal(np.asarray(buf.data["y"])[:3], y1[[0, 2, 3]])
    assert int(buf.n_seen) == 3
    x2, y2 = points(31, 4, 2)  # 3 fit, 1 competes
    before = np.asarray(buf.data["x"]).copy()
    buf2 = write(cfg, 2, buf, {"x": jnp.asarray(x2), "y": jnp.asarray(y2)},
                 jax.random.PRNGKey(1), jnp.ones(4, bool))
    got = np.asarray(buf2.data["x"])
    assert int(buf2.n_seen) == 7
    appended = np.concatenate([before[:3], x2[:3]])  # the fill, before the competition
    changed = [i for i in range(6) if not np.array_equal(got[i], appended[i])]
    assert len(changed) <= 1 and all(np.array_equal(got[i], x2[3]) for i in changed)


def test_check_config_rejects_bad_settings():
    from ocljax import models
    model = models.make_model("mlp", 4, width=8, depth=1)
    for bad in (dict(k=0), dict(n_smp_cls=0.5), dict(aser_type="sv"), dict(replay_batch=0)):
        with pytest.raises(ConfigError):
            aser.make(model, aser.Config(**bad))


def test_scores_follow_the_chosen_aser_type():
    sv_adv = jnp.asarray([[0.2, -0.1], [0.4, 0.3]])
    sv_coop = jnp.asarray([[0.1, 0.5], [0.3, -0.2], [9.0, 9.0]])
    adv_m, coop_m = jnp.ones(2, bool), jnp.asarray([1, 1, 0], bool)
    for kind, expected in (("asvm", [0.2 - 0.3, 0.15 - 0.1]), ("asv", [0.3 - 0.2, 0.5 + 0.1]),
                           ("neg_sv", [-0.6, -0.2])):
        np.testing.assert_allclose(aser.candidate_scores(kind, sv_adv, adv_m, sv_coop, coop_m),
                                   expected, rtol=1e-6)


def test_asv_without_cooperative_rows_still_replays():
    """Every memory row a candidate (one row per class, one drawn per class): the
    cooperative term is 0 and the candidates are ranked by the adversarial one alone."""
    cfg = aser.Config(buffer_size=3, replay_batch=2, k=1, n_smp_cls=1.0, aser_type="asv")
    mx, my = points(40, 3, 3)
    my = np.array([0, 1, 2])
    buf = full_buffer(mx, my)._replace(n_seen=jnp.asarray(9, jnp.int32))
    stream = {"x": jnp.asarray(points(41, 2, 3)[0]), "y": jnp.asarray([0, 1])}
    _, mask = retrieve(cfg, 3, buf, jax.random.PRNGKey(0), stream)
    np.testing.assert_array_equal(mask, [True, True])


def aser_run(cfg, steps, passes=None):
    """The ASER learner on the contract suite's batches: states before each step and keys."""
    from test_learner_contract import batches, step_of

    from ocljax import models
    model = models.make_model("mlp", 4, width=16, depth=1)
    learner = aser.make(model, cfg)
    bs = batches(n=steps)
    if passes is not None:
        bs = bs._replace(fresh=jnp.asarray(passes, bool))
    hp = aser.HParams()
    update = jax.jit(learner.update)
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    states, keys = [], []
    for i in range(steps):
        states.append(state)
        keys.append(jax.random.PRNGKey(100 + i))
        state, _ = update(state, step_of(bs, i), hp, keys[-1])
    return model, states + [state], keys


def test_each_step_writes_the_pending_batch_with_the_pre_step_network_then_reads():
    cfg = aser.Config(buffer_size=8, replay_batch=3, k=2, n_smp_cls=1.0)
    model, states, keys = aser_run(cfg, 5)
    before, after = states[3], states[4]  # 8 rows stored by step 2; step 3's 4 compete
    feats = lambda x: model.apply(before.net.params, {}, x, False)[1]  # noqa: E731
    expected = aser.write(cfg, 4, feats, before.buffer, before.pending,
                          jax.random.split(keys[3])[0], before.pending_valid)
    for a, b in zip(jax.tree.leaves(after.buffer), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(after.buffer.n_seen) == 12


def test_repeat_passes_write_nothing_and_the_switches_fall_back_to_er():
    cfg = aser.Config(buffer_size=8, replay_batch=3, k=2, n_smp_cls=1.0)
    _, states, _ = aser_run(cfg, 4, passes=[1, 0, 1, 0])
    assert [int(s.buffer.n_seen) for s in states] == [0, 0, 0, 4, 4]  # batch 0, once
    # memory_update="reservoir": the memory is er's reservoir (same write keys)
    cfg = aser.Config(buffer_size=8, replay_batch=3, memory_update="reservoir")
    _, states, keys = aser_run(cfg, 4)
    ref = er.flush(states[3], jax.random.split(keys[3])[0])
    for a, b in zip(jax.tree.leaves(states[4].buffer), jax.tree.leaves(ref.buffer), strict=True):
        np.testing.assert_array_equal(a, b)
