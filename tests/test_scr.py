"""Behaviour that makes SCR that method: SupCon over two views of stream + replay rows, a
projection head trained with the network, nearest-class-mean prediction over memory features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_learner
from test_learner_contract import B, batches, step_of, step_with_replay

from ocljax import augment, models
from ocljax.errors import ConfigError
from ocljax.learners import scr
from ocljax.memory import reservoir


def tiny_model():
    return models.make_model("mlp", 4, width=16, depth=1)


def supcon_reference(z, labels, temperature):
    """Khosla et al. 2020, Eq. 2 (L^sup_out) written as loops, averaged over anchors."""
    z, labels = np.asarray(z, np.float64), np.asarray(labels)
    losses = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        denominator = sum(np.exp(z[i] @ z[a] / temperature) for a in others)
        terms = [np.log(np.exp(z[i] @ z[p] / temperature) / denominator) for p in positives]
        losses.append(-np.mean(terms))
    return np.mean(losses)


def unit_rows(rng, n, d):
    z = rng.normal(size=(n, d))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_supcon_equals_eq2_with_repeated_and_single_labels():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 0, 2, 0])  # class 0 three times; 1 and 2 once (only the other view)
    z = unit_rows(rng, 2 * len(y), 6)
    labels = np.tile(y, 2)
    for t in (0.07, 0.5):
        got = scr.supcon_loss(jnp.asarray(z, jnp.float32), jnp.asarray(labels),
                              jnp.ones(len(labels), bool), t)
        np.testing.assert_allclose(float(got), supcon_reference(z, labels, t), rtol=1e-5)


def test_supcon_masked_rows_are_neither_anchors_nor_contrasts():
    rng = np.random.default_rng(1)
    y = np.array([0, 1, 0, 1, 2])
    labels = np.tile(y, 2)
    z = unit_rows(rng, len(labels), 5)
    valid = np.tile([True, True, False, True, True], 2)  # sample 2 (both views) is filler
    got = scr.supcon_loss(jnp.asarray(z, jnp.float32), jnp.asarray(labels), jnp.asarray(valid),
                          0.2)
    np.testing.assert_allclose(float(got), supcon_reference(z[valid], labels[valid], 0.2),
                               rtol=1e-5)
    grads = jax.grad(lambda z_: scr.supcon_loss(z_, jnp.asarray(labels), jnp.asarray(valid),
                                                0.2))(jnp.asarray(z, jnp.float32))
    assert np.isfinite(np.asarray(grads)).all()
    np.testing.assert_array_equal(np.asarray(grads)[~valid], 0.0)


def test_supcon_positives_are_the_other_views_and_exclude_the_anchor():
    # Two samples of different classes; each view equals its twin, the classes are orthogonal.
    # Anchor i: one positive (its twin, similarity 1/t); contrast set = twin + two others at 0.
    z = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = jnp.array([0, 1, 0, 1])
    t = 0.5
    expected = np.log(1 + 2 * np.exp(-1 / t))
    got = scr.supcon_loss(z, labels, jnp.ones(4, bool), t)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    # Same labels everywhere: every other view is a positive (three per anchor), never itself.
    same = scr.supcon_loss(z, jnp.zeros(4, jnp.int32), jnp.ones(4, bool), t)
    log_den = np.log(np.exp(1 / t) + 2)
    expected_same = -((1 / t - log_den) + 2 * (0 - log_den)) / 3
    np.testing.assert_allclose(float(same), expected_same, rtol=1e-6)


def numpy_projection(head, feats):
    h = np.maximum(np.asarray(feats) @ np.asarray(head["w1"]) + np.asarray(head["b1"]), 0)
    p = h @ np.asarray(head["w2"]) + np.asarray(head["b2"])
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def test_loss_is_supcon_of_original_and_augmented_views(monkeypatch):
    """First step (empty memory): the loss is SupCon over the stream rows' two views, the
    second one being what ``augment`` returned, through features and the projection head."""
    calls = []

    def fake_augment(key, x, spec):
        calls.append(spec)
        return 255 - x  # a transformation that surely changes every image

    monkeypatch.setattr(scr.aug, "augment", fake_augment)
    model = tiny_model()
    learner = scr.make(model, scr.Config(buffer_size=8, replay_batch=3, augment="crop1"))
    hp, bs = scr.HParams(temperature=0.3), batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    _, metrics = jax.jit(learner.update)(state, step_of(bs, 0), hp, jax.random.PRNGKey(1))
    assert calls == ["crop1"]
    params = state.net.params
    views = np.concatenate([bs.x[0], 255 - np.asarray(bs.x[0])])
    _, feats, _ = model.apply(params["net"], {}, jnp.asarray(views), True)
    z = numpy_projection(params["head"], feats)
    expected = supcon_reference(z, np.tile(np.asarray(bs.y[0]), 2), 0.3)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)


def test_replayed_rows_and_their_views_enter_the_supcon_loss(monkeypatch):
    """With a non-empty memory the loss is SupCon over (stream + replayed rows) x 2 views: the
    replayed rows are those ER's read draws with the same keys, and they change the loss."""
    monkeypatch.setattr(scr.aug, "augment", lambda key, x, spec: 255 - x)
    model = tiny_model()
    cfg = scr.Config(buffer_size=8, replay_batch=3, augment="crop1")
    state, metrics, x, y = step_with_replay(scr, model, cfg, scr.HParams(temperature=0.3))
    params = state.net.params
    _, feats, _ = model.apply(params["net"], {}, jnp.asarray(np.concatenate([x, 255 - x])), True)
    z = numpy_projection(params["head"], feats)
    expected = supcon_reference(z, np.tile(y, 2), 0.3)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)
    n = len(y)
    stream_only = np.r_[0:B, n:n + B]  # the two views of the stream rows alone
    assert not np.isclose(expected, supcon_reference(z[stream_only], np.tile(y, 2)[stream_only],
                                                     0.3))


def test_default_augmentation_makes_the_views_differ():
    x = jnp.asarray(batches().x[0])
    out = jax.jit(augment.augment, static_argnums=2)(jax.random.PRNGKey(3), x,
                                                     scr.Config().augment)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert all(not np.array_equal(a, b) for a, b in zip(np.asarray(out), np.asarray(x),
                                                        strict=True))


@pytest.fixture(scope="module")
def run():
    """Default SCR (augmentation included) on a memory of 8 rows, replaying all 8 of them,
    over the contract suite's batches: the states before each step and the metrics."""
    model = tiny_model()
    learner = scr.make(model, scr.Config(buffer_size=8, replay_batch=8))
    hp, bs = scr.HParams(), batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    update = jax.jit(learner.update)
    states, metrics = [state], []
    for i in range(5):
        state, m = update(state, step_of(bs, i), hp, jax.random.PRNGKey(i))
        states.append(state)
        metrics.append(m)
    return model, learner, hp, bs, states, metrics


def normalised(f):
    f = np.asarray(f)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def test_prepared_predictions_are_the_nearest_class_mean_of_memory_features(run):
    model, learner, hp, bs, states, _ = run
    state = states[4]
    prepared = jax.jit(learner.prepare_eval)(state, hp, jax.random.PRNGKey(5))
    assert bool(prepared.prepared) and not bool(state.prepared)
    buf = prepared.buffer
    assert int(buf.n_seen) == 4 * B  # the pending batch was written
    net_params = prepared.net.params["net"]
    n = int(reservoir.size(buf))
    _, f_buf, _ = model.apply(net_params, {}, buf.data["x"], False)
    f_buf, y_buf = normalised(f_buf)[:n], np.asarray(buf.data["y"])[:n]
    classes = sorted(set(y_buf.tolist()))
    means = normalised(np.stack([f_buf[y_buf == c].mean(0) for c in classes]))
    x = bs.x[5]
    _, f_x, _ = model.apply(net_params, {}, x, False)
    d2 = ((normalised(f_x)[:, None] - means[None]) ** 2).sum(-1)
    expected = np.array(classes)[np.argmin(d2, axis=1)]
    logits = learner.predict(prepared, x, hp)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1)), expected)
    np.testing.assert_allclose(np.asarray(logits)[:, classes], -d2, rtol=1e-4, atol=1e-5)
    absent = sorted(set(range(4)) - set(classes))
    assert np.isneginf(np.asarray(logits)[:, absent]).all()


def test_the_linear_classifier_is_neither_trained_nor_used(run):
    _, learner, hp, bs, states, _ = run
    first, last = states[0].net.params, states[-1].net.params
    # SupCon gives the network's own classifier layer no gradient ...
    jax.tree.map(np.testing.assert_array_equal, first["net"]["Dense_1"], last["net"]["Dense_1"])
    # ... while the hidden layer and the projection head are trained by the same step
    assert not np.allclose(first["net"]["Dense_0"]["kernel"], last["net"]["Dense_0"]["kernel"])
    assert not np.allclose(first["head"]["w1"], last["head"]["w1"])
    assert not np.allclose(first["head"]["w2"], last["head"]["w2"])
    # ... and predictions after prepare_eval do not depend on it
    prepared = learner.prepare_eval(states[-1], hp, jax.random.PRNGKey(5))
    scrambled = jax.tree.map(lambda a: a * -7.0 + 3.0, prepared.net.params["net"]["Dense_1"])
    params = {**prepared.net.params, "net": {**prepared.net.params["net"], "Dense_1": scrambled}}
    other = prepared._replace(net=prepared.net._replace(params=params))
    np.testing.assert_array_equal(learner.predict(prepared, bs.x[5], hp),
                                  learner.predict(other, bs.x[5], hp))


def test_stream_logits_use_memory_labels_only(run):
    model, _, _, bs, states, metrics = run
    # empty memory at step 0: no class mean exists, the incoming labels are not used
    assert np.isneginf(np.asarray(metrics[0]["stream_logits"])).all()
    # at step 3 the memory holds 8 rows and replay_batch = 8 replays all of them: the stream
    # logits are the nearest-mean logits of the whole memory under the pre-update network
    buf = states[4].buffer  # the memory as read at step 3 (its write happens at step 4)
    assert int(reservoir.size(buf)) == 8 and int(buf.n_seen) == 3 * B
    params = states[3].net.params["net"]
    _, f_buf, _ = model.apply(params, {}, buf.data["x"], False)
    f_buf, y_buf = normalised(f_buf), np.asarray(buf.data["y"])
    _, f_x, _ = model.apply(params, {}, bs.x[3], False)
    got = np.asarray(metrics[3]["stream_logits"])
    for c in range(4):
        if (y_buf == c).any():
            mean = normalised(f_buf[y_buf == c].mean(0, keepdims=True))[0]
            np.testing.assert_allclose(got[:, c], -((normalised(f_x) - mean) ** 2).sum(-1),
                                       rtol=1e-4, atol=1e-5)
            # an unprepared state keeps these replay-estimated means for ``predict``
            np.testing.assert_allclose(states[4].means[c], mean, rtol=1e-4, atol=1e-5)
        else:
            assert np.isneginf(got[:, c]).all()
    assert list(np.asarray(states[4].has_mean)) == [(y_buf == c).any() for c in range(4)]
    assert not bool(states[4].prepared)


def test_augment_both_with_adam_runs():
    model = tiny_model()
    cfg = scr.Config(buffer_size=8, replay_batch=3, augment_both=True, optimizer="adam")
    learner = scr.make(model, cfg)
    hp, bs = scr.HParams(), batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    update = jax.jit(learner.update)
    for i in range(2):  # the second step replays
        state, metrics = update(state, step_of(bs, i), hp, jax.random.PRNGKey(i))
        assert np.isfinite(float(metrics["loss"]))
    assert metrics["stream_logits"].shape == (B, 4)


def test_check_config_rejects_bad_settings():
    for bad in ({"proj_dim": 0}, {"augment": "rotate"}, {"replay_batch": 2000},
                {"optimizer": "rmsprop"}):
        with pytest.raises(ConfigError):
            scr.check_config(scr.Config(**bad))


def test_tiny_learner_defaults_are_the_registered_module():
    module, _ = tiny_learner("scr")
    assert module is scr and scr.HParams().temperature == pytest.approx(0.07)


def test_stream_logits_are_evaluation_mode_on_a_batchnorm_model():
    """With BatchNorm, the online prediction's class means and queries are embedded in
    evaluation mode (running statistics), not with the training forward's batch statistics:
    the same as on a model without BatchNorm."""
    from ocljax import models

    model = models.make_model("cnn_bn", 4, width=8)
    learner = scr.make(model, scr.Config(buffer_size=8, replay_batch=8))
    hp, bs = scr.HParams(), batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    update = jax.jit(learner.update)
    for i in range(3):
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(i))
    assert "batch_stats" in state.net.model_state
    new, metrics = update(state, step_of(bs, 3), hp, jax.random.PRNGKey(3))
    buf = new.buffer  # as read at step 3 (8 rows, all replayed)
    assert int(reservoir.size(buf)) == 8
    params, mstate = state.net.params["net"], state.net.model_state
    _, f_buf, _ = model.apply(params, mstate, buf.data["x"], False)
    _, f_x, _ = model.apply(params, mstate, bs.x[3], False)
    f_buf, y_buf = normalised(f_buf), np.asarray(buf.data["y"])
    got = np.asarray(metrics["stream_logits"])
    for c in range(4):
        if (y_buf == c).any():
            mean = normalised(f_buf[y_buf == c].mean(0, keepdims=True))[0]
            np.testing.assert_allclose(got[:, c], -((normalised(f_x) - mean) ** 2).sum(-1),
                                       rtol=1e-4, atol=1e-5)
