"""Behaviour that makes LwF that method: snapshots at boundaries, distillation towards them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_learner
from test_learner_contract import K, assert_trees_close, batches, step_of

from ocljax import learners, models
from ocljax.errors import ConfigError
from ocljax.learners import lwf


def run(learner, hp, bs, n=K, seed=0):
    """States before each update and after the last: a list of n + 1 states."""
    key = jax.random.PRNGKey(seed)
    state = learner.init(key, bs.x[0], hp)
    update = jax.jit(learner.update)
    states = [state]
    for i in range(n):
        state, _ = update(state, step_of(bs, i), hp, jax.random.fold_in(key, i))
        states.append(state)
    return states


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_distill(z, t, mask, temperature):
    """Li & Hoiem Eq. 2-3 over the masked units, written out in numpy."""
    z, t = np.asarray(z, np.float64)[:, mask], np.asarray(t, np.float64)[:, mask]
    q = np_softmax(t / temperature)
    log_p = np.log(np_softmax(z / temperature))
    return float(-(q * log_p).sum(-1).mean())


def np_ce(z, y):
    z = np.asarray(z, np.float64)
    return float(-np.log(np_softmax(z)[np.arange(len(y)), y]).mean())


def test_snapshot_is_taken_right_before_the_first_update_of_a_new_task():
    module, learner = tiny_learner("lwf")
    bs = batches()  # boundaries at steps 0 and 3
    states = run(learner, module.HParams(), bs)
    # states[i] is the state before update i; the boundary update 3 snapshots states[3]'s params
    for i in (1, 2, 3):
        assert_trees_close(states[i].snapshot, states[0].net.params, rtol=0, atol=0)
    for i in (4, 5, 6):
        assert_trees_close(states[i].snapshot, states[3].net.params, rtol=0, atol=0)
    # ... which is not the current network: the snapshot is frozen between boundaries
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), states[6].snapshot,
                        states[6].net.params)
    assert max(jax.tree.leaves(diff)) > 1e-4
    # distilled units: the classes seen before the boundary (none at the first one)
    assert not np.asarray(states[1].snapshot_seen).any()
    seen_before = np.zeros(4, bool)
    seen_before[np.unique(np.asarray(bs.y[:3]))] = True
    np.testing.assert_array_equal(states[4].snapshot_seen, seen_before)


def test_lam_zero_is_exactly_finetune():
    (fmod, finetune), (lmod, lwf_learner) = tiny_learner("finetune"), tiny_learner("lwf")
    bs = batches()
    f = run(finetune, fmod.HParams(), bs)[-1]
    zero = run(lwf_learner, lmod.HParams(lam=0.0), bs)[-1]
    assert_trees_close(zero.net.params, f.params, rtol=1e-6, atol=1e-7)
    # the comparison has teeth: with lam > 0 the distillation changes the updates after step 3
    one = run(lwf_learner, lmod.HParams(lam=1.0), bs)[-1]
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), one.net.params, f.params)
    assert max(jax.tree.leaves(diff)) > 1e-5


def test_distillation_loss_matches_a_hand_computation():
    z = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 0.3, -1.0, 2.0]], np.float32)
    t = np.array([[2.0, 0.0, -1.0, 1.0], [-0.5, 1.5, 4.0, 0.0]], np.float32)
    mask = np.array([True, True, False, True])
    got = float(lwf.distillation_loss(jnp.asarray(z), jnp.asarray(t), jnp.asarray(mask), 2.0))
    # by hand, row 0: q = softmax([1, 0, .5]) over units 0, 1, 3; p = softmax([.5, -1, 1.5])
    q0 = np.exp([1.0, 0.0, 0.5]) / np.exp([1.0, 0.0, 0.5]).sum()
    logp0 = np.array([0.5, -1.0, 1.5]) - np.log(np.exp([0.5, -1.0, 1.5]).sum())
    q1 = np.exp([-0.25, 0.75, 0.0]) / np.exp([-0.25, 0.75, 0.0]).sum()
    logp1 = np.array([0.0, 0.15, 1.0]) - np.log(np.exp([0.0, 0.15, 1.0]).sum())
    by_hand = -((q0 * logp0).sum() + (q1 * logp1).sum()) / 2
    np.testing.assert_allclose(got, by_hand, rtol=1e-6)
    np.testing.assert_allclose(got, np_distill(z, t, mask, 2.0), rtol=1e-6)
    # the unmasked unit plays no part; an empty mask switches the term off
    z2, t2 = z.copy(), t.copy()
    z2[:, 2], t2[:, 2] = 50.0, -50.0
    np.testing.assert_allclose(
        float(lwf.distillation_loss(jnp.asarray(z2), jnp.asarray(t2), jnp.asarray(mask), 2.0)),
        by_hand, rtol=1e-6)
    assert float(lwf.distillation_loss(jnp.asarray(z), jnp.asarray(t), jnp.zeros(4, bool),
                                       2.0)) == 0.0
    # the temperature is a traced value
    f = jax.jit(lambda T: lwf.distillation_loss(jnp.asarray(z), jnp.asarray(t),
                                                jnp.asarray(mask), T))
    np.testing.assert_allclose(float(f(3.0)), np_distill(z, t, mask, 3.0), rtol=1e-6)


def test_update_loss_is_ce_plus_lam_times_distillation_towards_the_snapshot():
    module, learner = tiny_learner("lwf")
    hp, bs = module.HParams(lam=0.7, temperature=2.0), batches()
    states = run(learner, hp, bs, n=4)
    before, update = states[4], jax.jit(learner.update)
    state, m = update(before, step_of(bs, 4), hp, jax.random.PRNGKey(9))
    apply = models.make_model("mlp", 4, width=16, depth=1).apply
    x, y = bs.x[4], np.asarray(bs.y[4])
    z = np.asarray(apply(before.net.params, {}, x, True)[0])
    t = np.asarray(apply(states[3].net.params, {}, x, True)[0])  # params at the boundary
    mask = np.asarray(before.snapshot_seen)
    assert mask.sum() >= 2  # a non-trivial distillation
    expected = np_ce(z, y) + 0.7 * np_distill(z, t, mask, 2.0)
    np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(m["stream_logits"], z, rtol=1e-5, atol=1e-6)
    # before any snapshot has seen a class, the loss is the plain cross-entropy
    _, m0 = update(states[0], step_of(bs, 0), hp, jax.random.PRNGKey(9))
    z0 = np.asarray(apply(states[0].net.params, {}, bs.x[0], True)[0])
    np.testing.assert_allclose(float(m0["loss"]), np_ce(z0, np.asarray(bs.y[0])), rtol=1e-5)


def test_snapshot_every_refreshes_on_a_task_free_stream():
    model = models.make_model("mlp", 4, width=16, depth=1)
    learner = lwf.make(model, lwf.Config(snapshot_every=2))
    bs = batches()
    bs = bs._replace(boundary=jnp.zeros_like(bs.boundary), task=jnp.zeros_like(bs.task))
    states = run(learner, lwf.HParams(), bs)
    for i in range(1, K + 1):
        last = 2 * ((i - 1) // 2)  # the latest update index that is a multiple of 2
        assert_trees_close(states[i].snapshot, states[last].net.params, rtol=0, atol=0)
    seen_before_2 = np.zeros(4, bool)
    seen_before_2[np.unique(np.asarray(bs.y[:2]))] = True
    np.testing.assert_array_equal(states[3].snapshot_seen, seen_before_2)


def test_boundaries_required_only_without_a_schedule():
    assert lwf.requires_boundaries(lwf.Config())
    assert not lwf.requires_boundaries(lwf.Config(snapshot_every=100))
    with pytest.raises(ConfigError, match="snapshot_every=N"):
        learners.check_stream("lwf", task_free=True)
    learners.check_stream("lwf", task_free=True, cfg=lwf.Config(snapshot_every=100))
    learners.check_stream("lwf", task_free=False)
    with pytest.raises(ConfigError, match="snapshot_every"):
        lwf.make(models.make_model("mlp", 4, width=16, depth=1), lwf.Config(snapshot_every=-1))
