"""Behaviour that makes DVC that method (Gu et al. CVPR 2022; YananGu/DVC): two views agreeing
through the Q head (cross-entropy on both, marginal entropy, L1 to Q's prediction), and replay
of the memory rows whose last-layer gradient a virtual step on the incoming loss grows most."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_learner_contract import B, batches, step_of

from ocljax import augment as aug
from ocljax import models
from ocljax.learners import dvc, er
from ocljax.memory import reservoir

C = 4
MODEL = models.make_model("mlp", C, width=16, depth=1)


def np_softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_dvc_loss(z, zt, q, y, valid, w):
    """The code's loss (exp_replay_dvc.py + loss.py), in numpy, on the valid rows."""
    z, zt, q, y = z[valid], zt[valid], q[valid], y[valid]
    if len(y) == 0:
        return 0.0
    logits, labels = np.concatenate([z, zt]), np.concatenate([y, y])
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ce = -logp[np.arange(len(labels)), labels].mean()
    pz, pzt, pq = np_softmax(z), np_softmax(zt), np_softmax(q)

    def agreement(p):
        m = p.sum(0) / p.sum()
        m = np.where(m < dvc.EPS, dvc.EPS, m)
        return (m * np.log(m)).sum()

    ag = (agreement(pz) + agreement(pzt) + agreement(pq)) / 3
    dl = np.abs(np.concatenate([pq, pq]) - np.concatenate([pz, pzt])).mean()
    return ce + ag + w * dl


@pytest.mark.parametrize("n_valid,scale", [(0, 2), (3, 2), (6, 2), (6, 60)])
def test_loss_matches_the_code_written_in_numpy(n_valid, scale):
    # scale 60: near one-hot predictions, whose marginals fall below EPS (the clamp matters)
    rng = np.random.default_rng(n_valid)
    z, zt, q = (rng.normal(size=(6, C)).astype(np.float32) * scale for _ in range(3))
    y = rng.integers(0, C, 6)
    valid = np.arange(6) < n_valid
    got = dvc.dvc_loss(jnp.asarray(z), jnp.asarray(zt), jnp.asarray(q), jnp.asarray(y),
                       jnp.asarray(valid), 1.7)
    np.testing.assert_allclose(got, np_dvc_loss(z, zt, q, y, valid, 1.7), rtol=1e-5, atol=1e-6)


def test_mgi_score_is_the_growth_of_the_last_layer_gradient_norm():
    rng = np.random.default_rng(0)
    h0, h1 = (jnp.asarray(rng.normal(size=(5, 7)), jnp.float32) for _ in range(2))
    w0, w1 = (jnp.asarray(rng.normal(size=(7, C)), jnp.float32) for _ in range(2))
    y = jnp.asarray(rng.integers(0, C, 5))

    def grad_l1(h, w):  # entrywise L1 norm of d CE / d W, one row at a time
        def ce(w, hi, yi):
            return -jax.nn.log_softmax(hi @ w)[yi]
        return jax.vmap(lambda hi, yi: jnp.abs(jax.grad(ce)(w, hi, yi)).sum())(h, y)

    got = dvc.mgi_scores(h0 @ w0, h0, h1 @ w1, h1, y)
    np.testing.assert_allclose(got, grad_l1(h1, w1) - grad_l1(h0, w0), rtol=1e-5, atol=1e-5)


AUG = "rrc20,flip,jitter40"  # a second view that differs from the first


def q_numpy_free(q, z, zt):
    """Q written out: Linear(2C, 128) on the two views' logits, ReLU, Linear(128, C)."""
    hidden = jnp.maximum(jnp.concatenate([z, zt], -1) @ q["w1"] + q["b1"], 0.0)
    return hidden @ q["w2"] + q["b2"]


def views(params, x, xt):
    """Raw-view logits, augmented-view logits and raw-view features, in one pass."""
    logits, h, _ = MODEL.apply(params["net"], {}, jnp.concatenate([x, xt]), True)
    n = x.shape[0]
    return logits[:n], logits[n:], h[:n]


def hand_loss(params, x, xt, y, w):
    z, zt, _ = views(params, x, xt)
    return dvc.dvc_loss(z, zt, q_numpy_free(params["q"], z, zt), y, jnp.ones(y.shape[0], bool),
                        w)


hand_grad = jax.jit(jax.value_and_grad(hand_loss))  # eager flax ops cost seconds here


@jax.jit
def hand_scores(params, virtual, x, xt, y):
    """Growth of |softmax(z) - onehot(y)|_1 |h|_1 on the raw view."""
    def size(p):
        z, _, h = views(p, x, xt)
        return jnp.abs(jax.nn.softmax(z) - jax.nn.one_hot(y, C)).sum(-1) * jnp.abs(h).sum(-1)
    return size(virtual) - size(params)


# all 8 stored rows are candidates, 2 are replayed
CFG = dvc.Config(buffer_size=8, candidates=8, replay_batch=2, augment=AUG)


@functools.lru_cache
def learner_for(cfg):
    """The learner and its jitted update, compiled once per config for the whole file."""
    learner = dvc.make(MODEL, cfg)
    return learner, jax.jit(learner.update)


def trained(cfg, n, hp):
    learner, update = learner_for(cfg)
    bs = batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    for i in range(n):
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(100 + i))
    return learner, state, bs


def top_pair(params, g_in, lr, cands, cand_view):
    virtual = jax.tree.map(lambda p, g: p - lr * g, params, g_in)
    scores = hand_scores(params, virtual, cands["x"], cand_view, cands["y"])
    return np.argsort(-np.asarray(scores))[:2], scores


@pytest.mark.parametrize("lr", [0.3, 3.0])
def test_step_replays_the_rows_whose_gradient_a_virtual_step_grows_most(lr):
    hp = dvc.HParams(lr=lr, dl_weight=1.5)
    learner, state, bs = trained(CFG, 3, hp)
    state = state._replace(pending_valid=jnp.zeros(B, bool))  # no write this step
    assert int(reservoir.size(state.buffer)) == 8
    b = step_of(bs, 3)
    key = jax.random.PRNGKey(11)
    _, k_read, k_view, k_mem_view = jax.random.split(key, 4)  # the learner's own keys
    xt = aug.augment(k_view, b.x, AUG)
    assert not np.array_equal(xt, b.x)
    params = state.net.params
    l_in, g_in = hand_grad(params, b.x, xt, b.y, 1.5)
    cands, mask = er.replay_rows(state.buffer, k_read, 8, {"x": b.x, "y": b.y})
    assert bool(mask.all())
    cand_view = aug.augment(k_mem_view, cands["x"], AUG)  # each candidate's own second view
    top, scores = top_pair(params, g_in, lr, cands, cand_view)
    l_mem, g_mem = hand_grad(params, cands["x"][top], cand_view[top], cands["y"][top], 1.5)
    new, metrics = learner_for(CFG)[1](state, b, hp, key)
    np.testing.assert_allclose(metrics["loss"], l_in + l_mem, rtol=1e-5)
    expected = jax.tree.map(lambda p, a, c: p - lr * (a + c), params, g_in, g_mem)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
                 new.net.params, expected)
    # ... and not any other pair of rows
    bottom = np.argsort(np.asarray(scores))[:2]
    other = hand_grad(params, cands["x"][bottom], cand_view[bottom], cands["y"][bottom], 1.5)[0]
    assert abs(float(other) - float(l_mem)) > 1e-4
    if lr == 3.0:  # the virtual step's size decides the pick: another lr picks other rows
        assert set(top_pair(params, g_in, 0.1, cands, cand_view)[0]) != set(top)


def test_q_reads_both_views_logits_and_starts_as_torch_linear_layers():
    q = dvc.init_q(jax.random.PRNGKey(0), 10)
    assert q["w1"].shape == (20, 128) and q["w2"].shape == (128, 10)
    for w, fan in ((q["w1"], 20), (q["b1"], 20), (q["w2"], 128), (q["b2"], 128)):
        bound = 1 / np.sqrt(fan)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    np.testing.assert_allclose(np.asarray(q["w1"]).std(), 1 / np.sqrt(20) / np.sqrt(3),
                               rtol=0.05)  # uniform, not normal
    rng = np.random.default_rng(0)
    z, zt = (jnp.asarray(rng.normal(size=(3, 10)), jnp.float32) for _ in range(2))
    np.testing.assert_allclose(dvc.q_head(q, z, zt), q_numpy_free(q, z, zt), rtol=1e-5,
                               atol=1e-6)


def test_empty_memory_trains_the_incoming_views_alone():
    hp = dvc.HParams(lr=0.3)
    learner, state, bs = trained(CFG, 0, hp)
    b = step_of(bs, 0)
    key = jax.random.PRNGKey(1)
    xt = aug.augment(jax.random.split(key, 4)[2], b.x, AUG)
    loss, grads = hand_grad(state.net.params, b.x, xt, b.y, hp.dl_weight)
    new, metrics = learner_for(CFG)[1](state, b, hp, key)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    jax.tree.map(lambda p, g, a: np.testing.assert_allclose(a, p - 0.3 * g, rtol=1e-5,
                                                            atol=1e-6),
                 state.net.params, grads, new.net.params)


def test_predictions_are_the_networks_logits_on_the_raw_image():
    learner, state, bs = trained(CFG, 3, dvc.HParams())
    x = bs.x[0]
    np.testing.assert_allclose(learner.predict(state, x, None),
                               MODEL.apply(state.net.params["net"], {}, x, False)[0], rtol=1e-6)
    # the Q head trains too
    fresh = learner.init(jax.random.PRNGKey(0), x, dvc.HParams())
    assert not np.allclose(fresh.net.params["q"]["w2"], state.net.params["q"]["w2"])


def test_incoming_rows_are_not_replayed_in_their_own_step():
    learner, state, bs = trained(CFG, 1, dvc.HParams())
    assert int(reservoir.size(state.buffer)) == 0  # batch 0 waits for step 1's write
    flushed = er.flush(state, jax.random.PRNGKey(0))
    assert int(reservoir.size(flushed.buffer)) == B
