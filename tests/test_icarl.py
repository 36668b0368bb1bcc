"""Behaviour that makes iCaRL that method: herding, per-class quotas, distillation, NME."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocljax import learners, models
from ocljax.errors import ConfigError
from ocljax.learners import icarl
from ocljax.types import Batch

C, B, STEPS_PER_TASK = 6, 4, 3
CFG = icarl.Config(buffer_size=12, replay_batch=3)


def model():
    return models.make_model("mlp", C, width=16, depth=1)


def herding_numpy(feats, labels, valid, m):
    """Algorithm 4 literally, per class, in float64 (picked samples are not picked again)."""
    phi = feats.astype(np.float64)
    phi = phi / np.maximum(np.linalg.norm(phi, axis=1, keepdims=True), 1e-12)
    rank = np.full(len(labels), len(labels))
    for c in np.unique(labels[valid]):
        idx = np.flatnonzero(valid & (labels == c))
        mu = phi[idx].mean(0)
        total = np.zeros_like(mu)
        left = list(idx)
        for k in range(min(m, len(idx))):
            costs = [np.linalg.norm(mu - (total + phi[j]) / (k + 1)) for j in left]
            j = left[int(np.argmin(costs))]
            rank[j] = k
            total += phi[j]
            left.remove(j)
    return rank


def test_herding_matches_brute_force_algorithm_4():
    rng = np.random.default_rng(0)
    n = 40
    feats = rng.normal(size=(n, 6)).astype(np.float32)
    labels = rng.integers(0, 4, n).astype(np.int32)
    labels[labels == 3] = 2  # class 3 absent
    valid = rng.random(n) < 0.85
    herd = jax.jit(icarl.herding_ranks, static_argnums=(3, 5))
    for m in (3, 100):
        for gram in (True, False):
            got = herd(jnp.asarray(feats), jnp.asarray(labels), jnp.asarray(valid), 5, m, gram)
            np.testing.assert_array_equal(np.asarray(got),
                                          herding_numpy(feats, labels, valid, m))
    # the quota: buffer 9 over 3 present classes -> the first 3 of each class's herding order
    select = jax.jit(icarl.select_exemplars, static_argnums=(3, 4))
    order, count, keep = select(jnp.asarray(feats), jnp.asarray(labels), jnp.asarray(valid), 5, 9)
    ref = herding_numpy(feats, labels, valid, 3) < 3
    np.testing.assert_array_equal(np.asarray(keep), ref)
    assert int(count) == 9
    np.testing.assert_array_equal(np.sort(np.asarray(order)[:9]), np.flatnonzero(ref))


def stream(seed=0):
    """Three tasks of classes (0, 1), (2, 3), (4, 5); each batch holds two of each class.

    Pixel (0, 0) of an image encodes its label, so a stored row's label can be checked."""
    rng = np.random.default_rng(seed)
    n = 3 * STEPS_PER_TASK
    x = rng.integers(0, 200, size=(n, B, 4, 4, 1), dtype=np.uint8)
    y = np.array([[2 * (t // STEPS_PER_TASK)] * 2 + [2 * (t // STEPS_PER_TASK) + 1] * 2
                  for t in range(n)], np.int32)
    x[:, :, 0, 0, 0] = 200 + 9 * y
    return Batch(
        x=jnp.asarray(x), y=jnp.asarray(y),
        task=jnp.asarray(np.arange(n) // STEPS_PER_TASK, jnp.int32),
        boundary=jnp.asarray(np.arange(n) % STEPS_PER_TASK == 0),
        t=jnp.arange(n, dtype=jnp.int32), fresh=jnp.ones((n,), bool),
    )


def step_of(bs, i):
    return jax.tree.map(lambda a: a[i], bs)


def run(learner, bs, n_steps):
    """States before each step and after the last."""
    hp = icarl.HParams()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    update = jax.jit(learner.update)
    states = [state]
    for i in range(n_steps):
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(10 + i))
        states.append(state)
    return states


@pytest.fixture(scope="module")
def trained():
    """The model, learner, stream and the states before each of the first 7 steps and after."""
    mdl = model()
    learner = icarl.make(mdl, CFG)
    bs = stream()
    return mdl, learner, bs, run(learner, bs, 2 * STEPS_PER_TASK + 1)


def memory_rows(state):
    n = int(state.memory.n_seen)
    return np.asarray(state.memory.data["x"])[:n], np.asarray(state.memory.data["y"])[:n]


def test_boundaries_herd_m_exemplars_per_seen_class_and_snapshot_the_teacher(trained):
    mdl, _, bs, states = trained
    # before the first boundary with data, the memory is empty and nothing is old
    assert int(states[STEPS_PER_TASK].memory.n_seen) == 0
    # first boundary: 2 classes seen, m = 12 // 2 = 6 = all six rows of each class
    x, y = memory_rows(states[STEPS_PER_TASK + 1])
    assert sorted(y.tolist()) == [0] * 6 + [1] * 6
    np.testing.assert_array_equal(x[:, 0, 0, 0], 200 + 9 * y)  # rows keep their own labels
    # second boundary: 4 classes, m = 12 // 4 = 3, chosen by herding with the network as it
    # was at the end of task 1, over the old exemplars and every row of task 1
    before = states[2 * STEPS_PER_TASK]
    after = states[2 * STEPS_PER_TASK + 1]
    x, y = memory_rows(after)
    assert sorted(y.tolist()) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    np.testing.assert_array_equal(x[:, 0, 0, 0], 200 + 9 * y)
    mem_x, mem_y = memory_rows(before)
    task1 = slice(STEPS_PER_TASK, 2 * STEPS_PER_TASK)
    pool_x = np.concatenate([mem_x, np.asarray(bs.x[task1]).reshape(-1, 4, 4, 1)])
    pool_y = np.concatenate([mem_y, np.asarray(bs.y[task1]).reshape(-1)])
    net = before.net
    _, feats, _ = mdl.apply(net.params, net.model_state, jnp.asarray(pool_x), False)
    keep = herding_numpy(np.asarray(feats), pool_y, np.ones(len(pool_y), bool), 3) < 3
    expected = sorted(map(bytes, pool_x[keep]))
    assert sorted(map(bytes, x)) == expected
    # the distillation teacher is the network at the boundary; old classes are those seen
    jax.tree.map(np.testing.assert_array_equal, after.old_params, before.net.params)
    assert np.asarray(after.old_classes).tolist() == [True] * 4 + [False] * 2
    assert np.asarray(before.old_classes).tolist() == [True] * 2 + [False] * 4
    # the candidates restart with the new task: only its first batch is waiting
    assert int(after.candidates.n_seen) == 0 and bool(after.pending_valid.all())


def bce(z, t):
    return -(t * np.log(1 / (1 + np.exp(-z))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-z))))


def test_icarl_loss_by_hand():
    logits = jnp.array([[1.0, -1.0, 0.5, 3.0], [0.0, 2.0, -2.0, 1.0], [9.0, 9.0, 9.0, 9.0]])
    old = jnp.array([[2.0, 0.0, 7.0, 7.0], [-1.0, 1.0, 7.0, 7.0], [0.0, 0.0, 0.0, 0.0]])
    labels = jnp.array([2, 0, 1])
    got = icarl.icarl_loss(logits, old, labels, jnp.array([True, True, False, False]),
                           jnp.array([True, True, True, False]), jnp.array([True, True, False]))
    s = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    row0 = bce(1.0, s(2.0)) + bce(-1.0, s(0.0)) + bce(0.5, 1.0)  # class 3 unseen: left out
    row1 = bce(0.0, s(-1.0)) + bce(2.0, s(1.0)) + bce(-2.0, 0.0)  # label 0 is old: distilled
    np.testing.assert_allclose(float(got), (row0 + row1) / 2, rtol=1e-5)


def test_update_loss_distils_to_the_snapshot_sigmoid_outputs(trained):
    mdl, learner, bs, states = trained
    state = states[STEPS_PER_TASK + 2]  # in task 1, teacher from the boundary, memory of 12 rows
    # keep replay_batch (3) exemplars so that replay draws all of them: the loss, a mean over
    # rows, does not depend on their order
    mem = state.memory._replace(n_seen=jnp.asarray(3, jnp.int32))
    state = state._replace(memory=mem)
    batch = step_of(bs, STEPS_PER_TASK + 2)
    _, metrics = jax.jit(learner.update)(state, batch, icarl.HParams(), jax.random.PRNGKey(3))
    x = np.concatenate([np.asarray(batch.x), np.asarray(mem.data["x"][:3])])
    y = np.concatenate([np.asarray(batch.y), np.asarray(mem.data["y"][:3])])
    z = np.asarray(mdl.apply(state.net.params, state.net.model_state, x, True)[0], np.float64)
    q = 1 / (1 + np.exp(-np.asarray(
        mdl.apply(state.old_params, state.old_model_state, x, False)[0], np.float64)))
    old = np.arange(C) < 2  # classes 0, 1 of task 0
    targets = np.where(old[None], q, np.eye(C)[y])
    counted = np.arange(C) < 4  # task 0's classes and the current task's (2, 3)
    expected = (bce(z, targets) * counted).sum(1).mean()
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    # the teacher differs from the student, so distillation targets are not just labels
    assert not np.allclose(q[:, :2], np.eye(C)[y][:, :2], atol=1e-2)


def test_prepared_state_predicts_nearest_mean_of_exemplars_including_current_task(trained):
    mdl, learner, bs, states = trained
    state = states[STEPS_PER_TASK + 2]  # in the middle of task 1
    hp = icarl.HParams()
    prepared = jax.jit(learner.prepare_eval)(state, hp, jax.random.PRNGKey(5))
    assert bool(prepared.prepared) and not bool(state.prepared)
    # the training state still holds task 0's exemplars only; evaluation sees task 1 too
    assert set(memory_rows(state)[1].tolist()) == {0, 1}
    x_mem, y_mem = memory_rows(prepared)
    assert sorted(y_mem.tolist()) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    net = state.net
    f = np.asarray(mdl.apply(net.params, net.model_state, jnp.asarray(x_mem), False)[1])
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    means = np.stack([f[y_mem == c].mean(0) for c in range(4)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    x = np.asarray(bs.x).reshape(-1, 4, 4, 1)
    fx = np.asarray(mdl.apply(net.params, net.model_state, jnp.asarray(x), False)[1])
    fx = fx / np.linalg.norm(fx, axis=1, keepdims=True)
    expected = np.argmin(((fx[:, None] - means[None]) ** 2).sum(-1), axis=1)
    got = np.argmax(np.asarray(learner.predict(prepared, jnp.asarray(x), hp)), -1)
    np.testing.assert_array_equal(got, expected)
    # a training state predicts with the sigmoid head
    head = mdl.apply(net.params, net.model_state, jnp.asarray(x), False)[0]
    np.testing.assert_allclose(learner.predict(state, jnp.asarray(x), hp), head, rtol=1e-6)


def test_refused_on_task_free_streams():
    with pytest.raises(ConfigError, match="task boundaries.*er_ncm"):
        learners.check_stream("icarl", task_free=True)
    learners.check_stream("icarl", task_free=False)
    assert icarl.requires_boundaries(icarl.Config())


def test_buffer_smaller_than_the_classes_is_refused():
    with pytest.raises(ConfigError, match="exemplar per class"):
        icarl.make(model(), icarl.Config(buffer_size=4, replay_batch=2))


def test_icarl_warns_on_streams_whose_classes_recur_across_tasks():
    from ocljax import learners, streams

    def note(name="icarl", **kw):
        return learners.stream_note(name, None, streams.StreamConfig(**kw))

    assert note() is None  # disjoint class-incremental: what iCaRL is for
    assert "blurry boundaries" in note(blurry=0.1)
    assert "a rotated stream" in note(kind="rotated")
    assert "a permuted stream" in note(kind="permuted")
    assert note("er", blurry=0.1) is None  # learners without the hook say nothing
