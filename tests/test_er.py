"""Behaviour that makes ER and ER-NCM those methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_learner
from test_learner_contract import B, batches, step_of

from ocljax import models
from ocljax.errors import ConfigError
from ocljax.learners import er, er_ncm, mir
from ocljax.memory import reservoir


def test_er_writes_each_fresh_batch_once_and_before_the_next_read():
    module, learner = tiny_learner("er")
    hp, bs = module.HParams(), batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    update = jax.jit(learner.update)
    for i in range(3):
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(i))
        # batch i is pending; batches < i are in the reservoir
        assert int(state.buffer.n_seen) == i * B
    repeat = step_of(bs, 2)._replace(fresh=jnp.asarray(False))
    state, _ = update(state, repeat, hp, jax.random.PRNGKey(9))  # a second pass over batch 2
    assert int(state.buffer.n_seen) == 2 * B  # a repeat never replays its own batch
    state, _ = update(state, repeat, hp, jax.random.PRNGKey(8))  # a third pass
    state, _ = update(state, step_of(bs, 3), hp, jax.random.PRNGKey(10))
    assert int(state.buffer.n_seen) == 3 * B  # batch 2 written once, at the next fresh step


def test_er_first_step_with_empty_buffer_is_plain_sgd():
    (fmod, finetune), (emod, er) = tiny_learner("finetune"), tiny_learner("er")
    bs, key = batches(), jax.random.PRNGKey(1)
    f = finetune.init(key, bs.x[0], fmod.HParams())
    e = er.init(key, bs.x[0], emod.HParams())
    f, fm = finetune.update(f, step_of(bs, 0), fmod.HParams(), key)
    e, em = er.update(e, step_of(bs, 0), emod.HParams(), key)
    jax.tree.map(np.testing.assert_allclose, f.params, e.net.params)
    np.testing.assert_allclose(fm["loss"], em["loss"], rtol=1e-6)


def trained(name, n_steps):
    """A tiny learner after ``n_steps`` updates on the contract suite's batches."""
    module, learner = tiny_learner(name)
    hp, bs = module.HParams(), batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    for i in range(n_steps):
        state, _ = learner.update(state, step_of(bs, i), hp, jax.random.PRNGKey(i))
    return learner, hp, bs, state


def test_er_replays_from_the_buffer():
    learner, hp, bs, state = trained("er", 3)
    # with a non-empty buffer the loss differs from the stream-only loss
    _, m_er = learner.update(state, step_of(bs, 3), hp, jax.random.PRNGKey(7))
    empty = state._replace(buffer=reservoir.init(8, state.buffer.data))
    _, m_empty = learner.update(empty._replace(pending_valid=jnp.zeros(B, bool)),
                                step_of(bs, 3), hp, jax.random.PRNGKey(7))
    assert not np.isclose(float(m_er["loss"]), float(m_empty["loss"]))


def test_replay_loss_weights_joint_and_sum():
    def normalised(mode, n, mask):
        weights, norm = er.replay_loss_weights(mode, n, mask)
        return np.asarray(weights) / float(norm)

    mask = jnp.asarray([True, True, False, False])
    joint = normalised("joint", 2, mask)
    np.testing.assert_allclose(joint, [0.25, 0.25, 0.25, 0.25, 0, 0])  # one mean over 4 rows
    summed = normalised("sum", 2, mask)
    np.testing.assert_allclose(summed, [0.5, 0.5, 0.5, 0.5, 0, 0])  # two means, added
    empty = normalised("sum", 2, jnp.zeros(3, bool))
    np.testing.assert_allclose(empty, [0.5, 0.5, 0, 0, 0])  # no replay: the stream's mean
    with pytest.raises(ConfigError, match="replay_loss"):
        er.check_config(er.Config(replay_loss="mean"))


@pytest.mark.parametrize("module", [er, mir])
def test_sum_replay_loss_is_joint_at_twice_the_step_with_a_full_replay_batch(module):
    """With plain SGD and as many replayed rows as incoming ones, the authors' "sum of two
    means" (MIR, the surveys' code) is the joint mean at twice the learning rate; with a
    partly filled memory it is not."""
    model = models.make_model("mlp", 4, width=16, depth=1)
    extra = {"candidates": B} if module is mir else {}
    make = lambda loss: module.make(model, module.Config(  # noqa: E731
        buffer_size=8, replay_batch=B, replay_loss=loss, **extra))
    joint, summed = make("joint"), make("sum")
    hp, bs = module.HParams(), batches()
    state = joint.init(jax.random.PRNGKey(0), bs.x[0], hp)
    for i in range(3):  # two batches written: the memory holds 2 B rows
        state, _ = joint.update(state, step_of(bs, i), hp, jax.random.PRNGKey(i))
    key = jax.random.PRNGKey(5)
    a, _ = summed.update(state, step_of(bs, 3), hp._replace(lr=0.05), key)
    b, _ = joint.update(state, step_of(bs, 3), hp._replace(lr=0.1), key)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
                 a.net.params, b.net.params)
    c, _ = joint.update(state, step_of(bs, 3), hp._replace(lr=0.05), key)
    assert not np.allclose(a.net.params["Dense_0"]["kernel"], c.net.params["Dense_0"]["kernel"])


def test_ncm_predicts_the_nearest_class_mean_of_buffer_features():
    learner, hp, bs, state = trained("er_ncm", 4)
    prepared = learner.prepare_eval(state, hp, jax.random.PRNGKey(5))
    assert bool(prepared.prepared) and not bool(state.prepared)
    # brute force: embed the buffer, average normalised features per class, nearest mean
    net, buf = prepared.er.net, prepared.er.buffer
    apply = tiny_model_apply()
    _, f_buf, _ = apply(net.params, net.model_state, buf.data["x"], False)
    n = int(reservoir.size(buf))
    f_buf, y_buf = np.asarray(f_buf)[:n], np.asarray(buf.data["y"])[:n]
    f_buf = f_buf / np.maximum(np.linalg.norm(f_buf, axis=1, keepdims=True), 1e-12)
    classes = sorted(set(y_buf.tolist()))
    means = np.stack([f_buf[y_buf == c].mean(0) for c in classes])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    x = bs.x[5]
    _, f_x, _ = apply(net.params, net.model_state, x, False)
    f_x = np.asarray(f_x) / np.maximum(np.linalg.norm(np.asarray(f_x), axis=1, keepdims=True),
                                       1e-12)
    expected = np.array(classes)[np.argmin(((f_x[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    got = np.asarray(jnp.argmax(learner.predict(prepared, x, hp), -1))
    np.testing.assert_array_equal(got, expected)


def tiny_model_apply():
    from ocljax import models

    return models.make_model("mlp", 4, width=16, depth=1).apply


def test_class_means_ignore_masked_rows():
    f = jnp.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    means, has = er_ncm.class_means(f, jnp.array([0, 1, 1]), jnp.array([True, True, False]), 3)
    np.testing.assert_allclose(means[:2], [[1, 0], [0, 1]], atol=1e-6)
    assert list(np.asarray(has)) == [True, True, False]


def test_er_masked_replay_rows_leave_batchnorm_statistics_alone():
    from ocljax import learners, models

    model = models.make_model("cnn_bn", 4, width=8)
    er = learners.er.make(model, learners.er.Config(buffer_size=8, replay_batch=B))
    ft = learners.finetune.make(model)
    bs, key = batches(), jax.random.PRNGKey(1)
    e = er.init(key, bs.x[0], learners.er.HParams())
    f = ft.init(key, bs.x[0], learners.finetune.HParams())
    e, em = er.update(e, step_of(bs, 0), learners.er.HParams(), key)  # empty buffer
    f, fm = ft.update(f, step_of(bs, 0), learners.finetune.HParams(), key)
    # the same training forward on the incoming rows (BatchNorm models return no stream
    # logits: their online prediction is the evaluation-mode predict)
    assert em["stream_logits"] is None and fm["stream_logits"] is None
    np.testing.assert_allclose(em["loss"], fm["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(e.net.model_state), jax.tree.leaves(f.model_state),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
