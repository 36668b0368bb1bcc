"""Behaviour that makes online EWC / EWC++ that method: a running Fisher, one quadratic
penalty anchored at the last boundary, consolidation only there."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_learner
from test_learner_contract import K, assert_trees_close, batches, step_of

from ocljax import learners, models
from ocljax.errors import ConfigError
from ocljax.learners import ewc_online

MODEL = models.make_model("mlp", 4, width=16, depth=1)


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


@jax.jit
@jax.grad
def row_loss_grad(params, x, y, i):
    """Gradient of row ``i``'s cross-entropy (the whole batch goes through the network)."""
    logits = MODEL.apply(params, {}, x, True)[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)[i]


def row_grads(params, x, y):
    """Reference per-row gradients of the cross-entropy, one jax.grad per row: list of
    flat numpy vectors (float64)."""
    return [flat(row_loss_grad(params, x, y, i)) for i in range(len(y))]


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


@pytest.mark.parametrize("mode", ["batch", "per_sample"])
def test_running_fisher_is_an_ema_of_squared_gradients(mode):
    learner = ewc_online.make(MODEL, ewc_online.Config(fisher=mode))
    hp, bs, alpha = ewc_online.HParams(alpha=0.3), batches(), 0.3
    states = run(learner, hp, bs, n=4)
    expected = np.zeros_like(flat(states[0].net.params))
    for i in range(4):
        g_rows = row_grads(states[i].net.params, bs.x[i], bs.y[i])  # pre-update parameters
        if mode == "batch":  # the square of the mini-batch (mean-loss) gradient
            f_new = np.square(np.mean(g_rows, axis=0))
        else:  # the mean of per-sample squared gradients
            f_new = np.mean(np.square(g_rows), axis=0)
        expected = alpha * f_new + (1 - alpha) * expected
        np.testing.assert_allclose(flat(states[i + 1].fisher), expected, rtol=1e-4, atol=1e-9)
    assert expected.max() > 1e-6


def test_penalty_and_its_gradient_match_numpy():
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,))}
    anchor = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,))}
    fisher = {"a": rng.uniform(size=(3, 2)), "b": rng.uniform(size=(4,))}
    j = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t)  # noqa: E731
    lam = 3.5
    value, grad = jax.value_and_grad(ewc_online.penalty)(j(params), j(anchor), j(fisher), lam)
    by_hand = 0.5 * lam * sum(((fisher[k] * (params[k] - anchor[k]) ** 2).sum()) for k in "ab")
    np.testing.assert_allclose(float(value), by_hand, rtol=1e-5)
    for k in "ab":
        np.testing.assert_allclose(grad[k], lam * fisher[k] * (params[k] - anchor[k]),
                                   rtol=1e-5, atol=1e-7)
    # zero, with a zero gradient, at the anchor
    value0, grad0 = jax.value_and_grad(ewc_online.penalty)(j(anchor), j(anchor), j(fisher), lam)
    assert float(value0) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad0))


def test_update_descends_cross_entropy_plus_penalty():
    learner = ewc_online.make(MODEL, ewc_online.Config(optimizer="sgd"))
    hp, bs = ewc_online.HParams(lr=0.1, lam=5.0), batches()
    state = run(learner, hp, bs, n=1)[-1]
    rng = np.random.default_rng(1)
    anchor = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype) * 0.1,
                          state.net.params)
    fstar = jax.tree.map(lambda p: jnp.asarray(rng.uniform(size=p.shape), p.dtype),
                         state.net.params)
    state = state._replace(anchor=anchor, consolidated=fstar)
    # step 1 is no boundary: the anchor and F* set above stay
    new, m = jax.jit(learner.update)(state, step_of(bs, 1), hp, jax.random.PRNGKey(0))
    theta, star, f = flat(state.net.params), flat(anchor), flat(fstar)
    g_ce = np.mean(row_grads(state.net.params, bs.x[1], bs.y[1]), axis=0)
    expected = theta - 0.1 * (g_ce + 5.0 * f * (theta - star))
    np.testing.assert_allclose(flat(new.net.params), expected, rtol=1e-5, atol=1e-6)
    logits = MODEL.apply(state.net.params, {}, bs.x[1], True)[0]
    ce = float(optax.softmax_cross_entropy_with_integer_labels(logits, bs.y[1]).mean())
    np.testing.assert_allclose(float(m["loss"]), ce + 2.5 * (f * (theta - star) ** 2).sum(),
                               rtol=1e-5)
    assert_trees_close(new.anchor, anchor, rtol=0, atol=0)  # not a boundary: anchor kept


def test_anchor_and_consolidated_fisher_change_only_at_boundaries():
    learner = ewc_online.make(MODEL)
    gamma = 0.5
    hp = ewc_online.HParams(gamma=gamma, alpha=0.5)
    bs = batches()
    bs = bs._replace(boundary=jnp.asarray(np.arange(K) % 2 == 0))  # boundaries at 0, 2, 4
    s = run(learner, hp, bs)
    expected_c = np.zeros_like(flat(s[0].fisher))
    for i in range(K):  # s[i] is the state before update i
        if i % 2 == 0:
            expected_c = gamma * expected_c + flat(s[i].fisher)
            expected_anchor = flat(s[i].net.params)
        np.testing.assert_allclose(flat(s[i + 1].consolidated), expected_c, rtol=1e-6,
                                   atol=1e-12)
        np.testing.assert_array_equal(flat(s[i + 1].anchor), expected_anchor)
    assert expected_c.max() > 0 and flat(s[K].fisher).max() > 0


def test_anchor_every_consolidates_on_a_schedule_on_a_task_free_stream():
    learner = ewc_online.make(MODEL, ewc_online.Config(anchor_every=3))
    bs = batches()
    bs = bs._replace(boundary=jnp.zeros_like(bs.boundary), task=jnp.zeros_like(bs.task))
    s = run(learner, ewc_online.HParams(gamma=0.9), bs)
    for i in range(1, K + 1):
        last = 3 * ((i - 1) // 3)
        np.testing.assert_array_equal(flat(s[i].anchor), flat(s[last].net.params))
    np.testing.assert_allclose(flat(s[4].consolidated), flat(s[3].fisher), rtol=1e-6)


def test_lam_zero_reproduces_finetune():
    (fmod, finetune), (emod, ewc) = tiny_learner("finetune"), tiny_learner("ewc_online")
    bs = batches()  # boundaries at 0 and 3: F* > 0 from update 3 on
    f = run(finetune, fmod.HParams(), bs)[-1]
    zero = run(ewc, emod.HParams(lam=0.0), bs)[-1]
    assert flat(zero.consolidated).max() > 0
    assert_trees_close(zero.net.params, f.params, rtol=1e-5, atol=1e-6)
    strong = run(ewc, emod.HParams(lam=1e4), bs)[-1]
    assert np.abs(flat(strong.net.params) - flat(f.params)).max() > 1e-4


def test_boundaries_required_only_without_a_schedule():
    assert ewc_online.requires_boundaries(ewc_online.Config())
    assert not ewc_online.requires_boundaries(ewc_online.Config(anchor_every=500))
    with pytest.raises(ConfigError, match="anchor_every=N"):
        learners.check_stream("ewc_online", task_free=True)
    learners.check_stream("ewc_online", task_free=True, cfg=ewc_online.Config(anchor_every=5))
    with pytest.raises(ConfigError, match="anchor_every"):
        ewc_online.make(MODEL, ewc_online.Config(anchor_every=-1))
    with pytest.raises(ConfigError, match="fisher"):
        ewc_online.make(MODEL, ewc_online.Config(fisher="true"))
