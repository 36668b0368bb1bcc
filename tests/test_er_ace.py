"""Behaviour that makes ER-ACE that method: the incoming rows compete only among their own
classes (Caccia et al. 2022, Sec. 4), the replayed rows among all classes."""

import jax
import jax.numpy as jnp
import numpy as np

from ocljax import models
from ocljax.learners import er_ace
from ocljax.memory import reservoir
from ocljax.types import Batch

C, B = 4, 4
MODEL = models.make_model("mlp", C, width=16, depth=1)
CFG = er_ace.Config(buffer_size=8, replay_batch=3)


def batch(labels, seed, fresh=True):
    x = np.random.default_rng(seed).integers(0, 255, size=(B, 4, 4, 1), dtype=np.uint8)
    return Batch(x=jnp.asarray(x), y=jnp.asarray(labels, jnp.int32), task=jnp.int32(0),
                 boundary=jnp.asarray(False), t=jnp.int32(seed), fresh=jnp.asarray(fresh))


def hand_ce(logits, labels, classes):
    """Mean over rows of -log softmax restricted to the columns ``classes`` (a Python list)."""
    sub = logits[:, classes]
    pos = jnp.asarray([classes.index(int(c)) for c in labels])
    logp = sub - jax.scipy.special.logsumexp(sub, axis=1, keepdims=True)
    return -jnp.mean(logp[jnp.arange(len(labels)), pos])


def test_incoming_gradient_is_zero_on_absent_classes_and_replay_gradient_is_not():
    rng = np.random.default_rng(0)
    s_logits = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    r_logits = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    s_y, r_y = jnp.array([0, 2, 0, 2]), jnp.array([1, 3, 2])
    allowed = er_ace.present_classes(s_y, 5)
    assert list(np.asarray(allowed)) == [True, False, True, False, False]

    def loss(s, r):
        return er_ace.ace_loss(s, s_y, r, r_y, jnp.ones(3, bool), allowed)

    (total, (inc, rep)), (g_s, g_r) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        s_logits, r_logits)
    absent = [1, 3, 4]
    assert np.all(np.asarray(g_s)[:, absent] == 0.0)  # exactly zero
    assert np.all(np.abs(np.asarray(g_s)[:, [0, 2]]) > 1e-4)
    assert np.all(np.abs(np.asarray(g_r)[:, absent]) > 1e-4)  # replay sees every class
    np.testing.assert_allclose(inc, hand_ce(s_logits, s_y, [0, 2]), rtol=1e-6)
    np.testing.assert_allclose(rep, hand_ce(r_logits, r_y, [0, 1, 2, 3, 4]), rtol=1e-6)
    np.testing.assert_allclose(total, inc + rep, rtol=1e-6)


def test_empty_buffer_step_is_a_masked_cross_entropy_step():
    learner = er_ace.make(MODEL, CFG)
    hp, key = er_ace.HParams(lr=0.3), jax.random.PRNGKey(1)
    b = batch([0, 1, 1, 0], seed=0)
    state = learner.init(key, b.x, hp)
    new, metrics = learner.update(state, b, hp, key)

    def masked(params):  # cross-entropy over classes {0, 1} only, written out
        logits = MODEL.apply(params, {}, b.x, True)[0]
        return hand_ce(logits, b.y, [0, 1])

    loss, grads = jax.value_and_grad(masked)(state.net.params)
    expected = jax.tree.map(lambda p, g: p - 0.3 * g, state.net.params, grads)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
                 new.net.params, expected)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    plain = hand_ce(MODEL.apply(state.net.params, {}, b.x, True)[0], b.y, [0, 1, 2, 3])
    assert not np.isclose(float(metrics["loss"]), float(plain))  # the mask did something
    # stream_logits are the unmasked pre-update logits
    np.testing.assert_allclose(metrics["stream_logits"],
                               MODEL.apply(state.net.params, {}, b.x, True)[0], rtol=1e-6)


def head(state, c):
    p = state.net.params["Dense_1"]
    return np.asarray(p["kernel"][:, c]), np.asarray(p["bias"][c])


def test_absent_class_head_is_moved_only_by_replay():
    learner = er_ace.make(MODEL, CFG)
    hp = er_ace.HParams()
    state = learner.init(jax.random.PRNGKey(0), batch([0] * 4, 0).x, hp)
    for i, labels in enumerate([[2, 3, 2, 3], [3, 2, 3, 2]]):  # old classes 2, 3
        state, _ = learner.update(state, batch(labels, i), hp, jax.random.PRNGKey(i))
    new_task = batch([0, 1, 0, 1], 5)
    # empty buffer: only the incoming term, which cannot touch the heads of classes 2 and 3
    empty = state._replace(buffer=reservoir.init(8, state.buffer.data),
                           pending_valid=jnp.zeros(B, bool))
    moved, _ = learner.update(empty, new_task, hp, jax.random.PRNGKey(9))
    for c in (2, 3):
        np.testing.assert_array_equal(head(moved, c)[1], head(empty, c)[1])
        np.testing.assert_array_equal(head(moved, c)[0], head(empty, c)[0])
    assert not np.allclose(head(moved, 0)[1], head(empty, 0)[1])
    # with old classes in the buffer the replay term moves them
    replayed, _ = learner.update(state, new_task, hp, jax.random.PRNGKey(9))
    assert int(reservoir.size(replayed.buffer)) == 8
    for c in (2, 3):
        assert not np.allclose(head(replayed, c)[1], head(state, c)[1])


def test_unmask_unseen_leaves_never_seen_classes_in_the_incoming_loss():
    learner = er_ace.make(MODEL, er_ace.Config(buffer_size=8, replay_batch=3,
                                               unmask_unseen=True))
    hp, key = er_ace.HParams(), jax.random.PRNGKey(3)
    b0 = batch([0, 1, 1, 0], 0)
    state = learner.init(key, b0.x, hp)
    s1, m = learner.update(state, b0, hp, key)
    # nothing else seen yet: every class is allowed, i.e. plain cross-entropy
    plain = hand_ce(MODEL.apply(state.net.params, {}, b0.x, True)[0], b0.y, [0, 1, 2, 3])
    np.testing.assert_allclose(m["loss"], plain, rtol=1e-6)
    assert list(np.asarray(s1.seen)) == [True, True, False, False]
    # class 2 arrives: seen classes 0, 1 are masked, never-seen class 3 is not
    s1 = s1._replace(pending_valid=jnp.zeros(B, bool))  # keep the buffer empty
    s2, _ = learner.update(s1, batch([2, 2, 2, 2], 1), hp, key)
    for c in (0, 1):
        np.testing.assert_array_equal(head(s2, c)[1], head(s1, c)[1])
    assert not np.allclose(head(s2, 3)[1], head(s1, 3)[1])
    assert list(np.asarray(s2.seen)) == [True, True, True, False]
