"""Behaviour that makes ER-AML that method: each incoming row is pulled toward a positive of its
class and pushed from a negative of another *incoming* class (never an old one), by the
authors' supervised-contrastive form; replayed rows alone get the cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_learner_contract import batches, step_of

from ocljax import models
from ocljax.learners import er, er_aml
from ocljax.losses import cross_entropy


def tiny_model():
    return models.make_model("mlp", 4, width=16, depth=1)


def sup_con_reference(anchor, anchor_y, contrast, contrast_y, temperature):
    """The authors' ``sup_con_loss`` with anchors repeated twice, as ``process_inc`` calls it."""
    a, ay = np.tile(anchor, (2, 1)), np.tile(anchor_y, 2)
    losses = []
    for i in range(len(a)):
        logits = contrast @ a[i] / temperature
        log_prob = logits - np.log(np.exp(logits).sum())
        pos = contrast_y == ay[i]
        losses.append(-(temperature / 0.07) * log_prob[pos].sum() / pos.sum())
    return np.mean(losses)


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_loss_is_the_authors_sup_con_over_positives_and_negatives():
    rng = np.random.default_rng(0)
    anchor, y = unit(rng.normal(size=(4, 6))), np.array([0, 1, 0, 2])
    pos = unit(rng.normal(size=(4, 6)))
    neg, neg_y = unit(rng.normal(size=(4, 6))), np.array([1, 0, 2, 0])
    contrast, contrast_y = np.concatenate([pos, neg]), np.concatenate([y, neg_y])
    ok = np.array([True, True, False, True])
    got = er_aml.aml_loss(jnp.asarray(anchor), jnp.asarray(y), jnp.asarray(contrast),
                          jnp.asarray(contrast_y), jnp.asarray(ok), jnp.asarray(np.tile(ok, 2)),
                          0.2)
    keep = np.tile(ok, 2)
    expected = sup_con_reference(anchor[ok], y[ok], contrast[keep], contrast_y[keep], 0.2)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_positives_share_the_label_and_negatives_come_from_the_incoming_classes_only():
    """Pool: memory rows of classes 0-3 (row 7 not filled yet), then the incoming batch of
    classes 2 and 3. Negatives are never of the old classes 0 and 1, positives never the row
    itself; over many draws every qualifying row is drawn."""
    pool_y = jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3, 2, 3, 3, 2])
    valid = jnp.asarray([1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1], bool)
    seen_pos, seen_neg = set(), set()
    draw = jax.jit(er_aml.positives_and_negatives, static_argnums=3)
    for i in range(200):
        pos, neg, ok = map(np.asarray, draw(jax.random.PRNGKey(i), pool_y, valid, 4))
        assert ok.all()
        for j, (p, n) in enumerate(zip(pos, neg, strict=True)):
            me = 8 + j
            assert pool_y[p] == pool_y[me] and p != me and bool(valid[p])
            assert pool_y[n] != pool_y[me] and int(pool_y[n]) in (2, 3) and bool(valid[n])
            seen_pos.add((j, int(p)))
            seen_neg.add((j, int(n)))
    # incoming row 0 (class 2): positives 2, 6, 11; negatives all class-3 rows but unfilled 7
    assert {p for j, p in seen_pos if j == 0} == {2, 6, 11}
    assert {n for j, n in seen_neg if j == 0} == {3, 9, 10}


def test_a_row_without_positive_or_negative_is_left_out():
    pool_y = jnp.asarray([0, 0, 1, 2])  # memory: classes 0, 0; incoming: classes 1 and 2
    valid = jnp.ones(4, bool)
    _, _, ok = er_aml.positives_and_negatives(jax.random.PRNGKey(0), pool_y, valid, 2)
    np.testing.assert_array_equal(ok, [False, False])  # classes 1 and 2 have no positive
    pool_y = jnp.asarray([1, 0, 1, 1])  # incoming: 1 and 1: positives exist, no negative class
    _, _, ok = er_aml.positives_and_negatives(jax.random.PRNGKey(0), pool_y, valid, 2)
    np.testing.assert_array_equal(ok, [False, False])


@pytest.mark.parametrize("step", [1, 3])
def test_step_loss_is_metric_on_incoming_plus_replay_cross_entropy(step):
    """With rows in memory (4 of 8 at step 1: the pool has unfilled rows; full at step 3),
    the step's loss is ``aml_loss`` on the incoming rows and the rows drawn with the step's
    keys, plus the replayed rows' cross-entropy (pre-step network)."""
    model = tiny_model()
    cfg = er_aml.Config(buffer_size=8, replay_batch=3)
    learner = er_aml.make(model, cfg)
    hp, bs = er_aml.HParams(), batches()
    update = jax.jit(learner.update)
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    first, m0 = update(state, step_of(bs, 0), hp, jax.random.PRNGKey(1))
    logits0 = model.apply(state.net.params, {}, bs.x[0], True)[0]
    np.testing.assert_allclose(float(m0["loss"]), float(cross_entropy(logits0, bs.y[0])),
                               rtol=1e-5)  # empty memory: plain cross-entropy
    state = first
    for i in range(1, step):
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(i + 1))
    key = jax.random.PRNGKey(42)
    _, metrics = update(state, step_of(bs, step), hp, key)
    k_write, k_read, k_pair = jax.random.split(key, 3)
    flushed = er.flush(state, k_write)
    stream = {"x": bs.x[step], "y": bs.y[step]}
    replay, mask = er.replay_rows(flushed.buffer, k_read, 3, stream)
    pool_x = jnp.concatenate([flushed.buffer.data["x"], bs.x[step]])
    pool_y = jnp.concatenate([flushed.buffer.data["y"], bs.y[step]])
    filled = np.arange(8) < min(4 * step, 8)
    pos, neg, ok = er_aml.positives_and_negatives(k_pair, pool_y,
                                                  jnp.asarray(np.r_[filled, [True] * 4]), 4)
    params = state.net.params
    feat = lambda x: unit(np.asarray(model.apply(params, {}, x, True)[1], np.float64))  # noqa: E731
    ok = np.asarray(ok)
    contrast = np.concatenate([feat(pool_x[pos]), feat(pool_x[neg])])
    contrast_y = np.concatenate([np.asarray(pool_y[pos]), np.asarray(pool_y[neg])])
    keep = np.tile(ok, 2)
    expected = sup_con_reference(feat(bs.x[step])[ok], np.asarray(bs.y[step])[ok], contrast[keep],
                                 contrast_y[keep], 0.2) if ok.any() else 0.0
    rep_logits = model.apply(params, {}, replay["x"], True)[0]
    expected += float(cross_entropy(rep_logits, replay["y"], mask))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)


def test_old_classes_are_not_pushed_by_the_incoming_loss():
    """The asymmetry: the incoming term's gradient does not reach the classifier at all (the
    metric loss reads features only), so old classes' logits move only through replay."""
    model = tiny_model()
    rng = np.random.default_rng(1)
    params, _ = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 4, 4, 1), jnp.uint8))

    def incoming(p):
        x = jnp.asarray(rng.integers(0, 255, size=(6, 4, 4, 1)), jnp.uint8)
        _, feats, _ = model.apply(p, {}, x, True)
        f = feats / jnp.linalg.norm(feats, axis=1, keepdims=True)
        return er_aml.aml_loss(f[:2], jnp.asarray([2, 3]), f[2:], jnp.asarray([2, 3, 3, 2]),
                               jnp.ones(2, bool), jnp.ones(4, bool), 0.2)

    grads = jax.grad(incoming)(params)
    head = [g for g in jax.tree.leaves(grads) if g.shape[-1] == 4]
    assert head and all(np.all(np.asarray(g) == 0) for g in head)
    assert any(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grads)
               if g.shape[-1] != 4)
