"""Behaviour that makes PCR that method: each row is contrasted with the proxies of the rows of
its own batch (stream + replay, two views), so the proxies of classes absent from the batch get
no gradient; no step before the memory has rows; prediction by cosine similarity to proxies."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from test_learner_contract import B, batches, step_of, step_with_replay

from ocljax import models
from ocljax.errors import ConfigError
from ocljax.learners import pcr


def tiny_model():
    return models.make_model("mlp", 4, width=16, depth=1)


def unit_rows(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def proxy_supcon_reference(feats, proxies, labels, temperature):
    """The authors' ``SupConLoss(contrast_mode='proxy')`` written as loops: anchor i against the
    proxy of every row j of the batch (itself included), positives the rows with i's label,
    mean of the positives' log-probabilities, then the mean over anchors."""
    z, w = unit_rows(feats), unit_rows(proxies)
    losses = []
    for i in range(len(z)):
        s = np.array([z[i] @ w[labels[j]] / temperature for j in range(len(z))])
        log_prob = s - np.log(np.exp(s).sum())
        losses.append(-np.mean([log_prob[j] for j in range(len(z)) if labels[j] == labels[i]]))
    return np.mean(losses)


def test_loss_equals_the_authors_proxy_contrast_with_repeated_labels():
    rng = np.random.default_rng(0)
    feats, proxies = rng.normal(size=(9, 6)), rng.normal(size=(5, 6))
    labels = np.array([0, 1, 0, 3, 0, 1, 3, 3, 0])  # class 2 and 4 absent; counts 4, 2, 3
    for t in (0.09, 0.7):
        logits = pcr.cosine_logits(jnp.asarray(feats, jnp.float32),
                                   jnp.asarray(proxies, jnp.float32), t)
        got = pcr.pcr_loss(logits, jnp.asarray(labels), jnp.ones(9, bool))
        np.testing.assert_allclose(float(got), proxy_supcon_reference(feats, proxies, labels, t),
                                   rtol=1e-5)


def test_masked_rows_are_neither_anchors_nor_counted():
    rng = np.random.default_rng(1)
    feats, proxies = rng.normal(size=(8, 5)), rng.normal(size=(4, 5))
    labels = np.array([0, 1, 2, 1, 0, 2, 2, 3])
    valid = np.array([True, True, True, False, True, False, True, False])
    logits = pcr.cosine_logits(jnp.asarray(feats, jnp.float32), jnp.asarray(proxies, jnp.float32),
                               0.2)
    got = pcr.pcr_loss(logits, jnp.asarray(labels), jnp.asarray(valid))
    np.testing.assert_allclose(
        float(got), proxy_supcon_reference(feats[valid], proxies, labels[valid], 0.2), rtol=1e-5)


def test_proxies_of_classes_absent_from_the_batch_get_no_gradient():
    """The property PCR is built on (Lin et al. 2023, its analysis of the two replay manners):
    a softmax over all proxies pushes every absent (old) class's proxy away from the new
    samples; PCR's contrast set holds only the batch's classes, so absent proxies are left as
    they are."""
    rng = np.random.default_rng(2)
    feats = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    proxies = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    labels = jnp.asarray([0, 2, 0, 2, 2, 0])

    def loss(p, kind):
        logits = pcr.cosine_logits(feats, p, 0.09)
        if kind == "pcr":
            return pcr.pcr_loss(logits, labels, jnp.ones(6, bool))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    g_pcr = np.asarray(jax.grad(loss)(proxies, "pcr"))
    g_all = np.asarray(jax.grad(loss)(proxies, "all"))
    assert np.all(g_pcr[[1, 3]] == 0.0) and np.all(np.abs(g_pcr[[0, 2]]).sum(1) > 0)
    assert np.all(np.abs(g_all[[1, 3]]).sum(1) > 1e-3)  # a plain softmax moves them


def test_loss_is_over_stream_and_replayed_rows_in_two_views(monkeypatch):
    """With rows in memory the loss is ``pcr_loss`` over (stream + the rows ER's read draws with
    the same keys) x (original, augmented), in the pre-step network and proxies."""
    monkeypatch.setattr(pcr.aug, "augment", lambda key, x, spec: 255 - x)
    model = tiny_model()
    cfg = pcr.Config(buffer_size=8, replay_batch=3, augment="crop1")
    state, metrics, x, y = step_with_replay(pcr, model, cfg, pcr.HParams(temperature=0.3))
    y = np.tile(y, 2)
    params = state.net.params
    _, feats, _ = model.apply(params["net"], {}, jnp.asarray(np.concatenate([x, 255 - x])), True)
    expected = proxy_supcon_reference(np.asarray(feats), np.asarray(params["proxies"]), y, 0.3)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)


def test_no_step_while_the_memory_is_empty_then_training_leaves_unseen_proxies_alone():
    """The authors' code multiplies its only loss term by zero until the memory has rows; from
    then on only the proxies of classes that were in some batch move."""
    model = tiny_model()
    learner = pcr.make(model, pcr.Config(buffer_size=8, replay_batch=3))
    hp, bs = pcr.HParams(), batches()
    bs = bs._replace(y=bs.y % 2)  # classes 0 and 1 only
    update = jax.jit(learner.update)
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    first, metrics = update(state, step_of(bs, 0), hp, jax.random.PRNGKey(1))
    assert float(metrics["loss"]) == 0.0
    for a, b in zip(jax.tree.leaves(first.net.params), jax.tree.leaves(state.net.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    later = first
    for i in range(1, 5):
        later, metrics = update(later, step_of(bs, i), hp, jax.random.PRNGKey(i + 1))
    assert float(metrics["loss"]) > 0.0
    p0, p1 = np.asarray(state.net.params["proxies"]), np.asarray(later.net.params["proxies"])
    np.testing.assert_array_equal(p1[2:], p0[2:])
    assert not np.allclose(p1[:2], p0[:2])
    # the network's own linear classifier never gets a gradient
    for a, b in zip(jax.tree.leaves(later.net.params["net"]), jax.tree.leaves(
            state.net.params["net"]), strict=True):
        if a.shape[-1] == model.num_classes:
            np.testing.assert_array_equal(a, b)


def test_prediction_is_the_nearest_proxy_by_cosine():
    """``predict`` ranks classes by the cosine of the features with each proxy: rescaling a
    proxy changes nothing, and the argmax is the proxy best aligned with the features."""
    model = tiny_model()
    learner = pcr.make(model, pcr.Config(buffer_size=8, replay_batch=3))
    hp, bs = pcr.HParams(), batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    x = bs.x[1]
    feats = np.asarray(model.apply(state.net.params["net"], {}, x, False)[1])
    proxies = np.asarray(state.net.params["proxies"])
    expected = (unit_rows(feats) @ unit_rows(proxies).T).argmax(1)
    got = np.asarray(learner.predict(state, x, hp)).argmax(1)
    np.testing.assert_array_equal(got, expected)
    params = dict(state.net.params, proxies=state.net.params["proxies"] * jnp.asarray(
        [[10.0], [0.1], [3.0], [1.0]]))
    scaled = state._replace(net=state.net._replace(params=params))
    np.testing.assert_allclose(learner.predict(scaled, x, hp), learner.predict(state, x, hp),
                               rtol=1e-5, atol=1e-5)


def test_check_config_rejects_bad_settings():
    for bad in (dict(replay_batch=0), dict(augment="spin9"), dict(optimizer="lion"),
                dict(replay_batch=20, buffer_size=10)):
        try:
            pcr.make(tiny_model(), pcr.Config(**bad))
        except ConfigError:
            continue
        raise AssertionError(f"{bad} was accepted")


def test_stream_logits_are_the_pre_update_cosine_logits():
    model = tiny_model()
    learner = pcr.make(model, pcr.Config(buffer_size=8, replay_batch=3))
    hp, bs = pcr.HParams(), batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    update = jax.jit(learner.update)
    state, _ = update(state, step_of(bs, 0), hp, jax.random.PRNGKey(1))
    _, metrics = update(state, step_of(bs, 1), hp, jax.random.PRNGKey(2))
    np.testing.assert_allclose(metrics["stream_logits"], learner.predict(state, bs.x[1], hp),
                               rtol=1e-5, atol=1e-5)
    assert metrics["stream_logits"].shape == (B, 4)


def test_a_zero_feature_row_gets_a_finite_gradient_not_nan():
    """The features' norm is floored without the NaN derivative of a norm at 0 (a model whose
    features do not end in a ReLU could emit an all-zero row): the gradient stays finite."""
    feats = jnp.asarray([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    proxies = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])

    def loss(f):
        return pcr.pcr_loss(pcr.cosine_logits(f, proxies, 0.09), jnp.asarray([0, 1]),
                            jnp.ones(2, bool))

    grad = np.asarray(jax.grad(loss)(feats))
    assert np.all(np.isfinite(grad)) and np.abs(grad[0]).max() < 1e7
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pcr.unit_rows(feats[1:]))), 1.0,
                               rtol=1e-6)
