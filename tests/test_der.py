"""Behaviour that makes DER / DER++ those methods (Buzzega et al. 2020, Algorithm 1): logits
stored with each example at its arrival, matched by MSE; DER++ adds label replay on a second,
independent draw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_learner_contract import B, batches, step_of

from ocljax import learners, models
from ocljax.learners import der
from ocljax.memory import reservoir

C = 4
MODEL = models.make_model("mlp", C, width=16, depth=1)
CFG = der.Config(buffer_size=8, replay_batch=3)


def forward(params, x):
    return MODEL.apply(params, {}, x, True)[0]


def hand_ce(logits, labels):
    logp = logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True)
    return -jnp.mean(logp[jnp.arange(labels.shape[0]), labels])


def run(learner, hp, n, bs=None, cfg_key=0):
    """``n`` updates on the contract batches; returns the state and the params before each."""
    bs = batches() if bs is None else bs
    state = learner.init(jax.random.PRNGKey(cfg_key), bs.x[0], hp)
    update = learner.update  # eager: a few steps are cheaper than a compile
    before = []
    for i in range(n):
        before.append(state.net.params)
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(100 + i))
    return state, before


def test_registry_serves_der_and_derpp_namespaces():
    d, p = learners.get("der"), learners.get("derpp")
    assert "2020" in d.__doc__ and "2020" in p.__doc__
    assert d.HParams._fields == ("lr", "alpha") and p.HParams._fields == ("lr", "alpha", "beta")
    assert d.Config is p.Config and d.make is der.make and p.make is der.make_plus
    assert isinstance(p.make(MODEL, CFG).default_hparams,
                      der.HParamsPlus)


def test_stored_logits_are_that_steps_forward_pass():
    learner = der.make(MODEL, CFG)
    bs = batches()
    state, before = run(learner, der.HParams(), 3, bs)
    # batches 0 and 1 were written (deferred) into rows 4i..4i+3 of the 8-row buffer
    assert int(state.buffer.n_seen) == 2 * B
    for i in range(2):
        rows = slice(i * B, (i + 1) * B)
        np.testing.assert_array_equal(state.buffer.data["x"][rows], bs.x[i])
        np.testing.assert_array_equal(state.buffer.data["y"][rows], bs.y[i])
        stored = state.buffer.data["logits"][rows]
        np.testing.assert_allclose(stored, forward(before[i], bs.x[i]), rtol=1e-5, atol=1e-6)
        # ... and not those of the parameters after that step's update
        assert not np.allclose(stored, forward(before[i + 1], bs.x[i]), atol=1e-4)
    np.testing.assert_allclose(state.pending["logits"], forward(before[2], bs.x[2]),
                               rtol=1e-5, atol=1e-6)
    # a repeat pass over batch 2 trains but keeps the logits of its fresh pass
    repeat = step_of(bs, 2)._replace(fresh=jnp.asarray(False))
    again, _ = learner.update(state, repeat, der.HParams(), jax.random.PRNGKey(7))
    np.testing.assert_array_equal(again.pending["logits"], state.pending["logits"])
    assert int(again.buffer.n_seen) == 2 * B
    assert not np.allclose(forward(again.net.params, bs.x[2]), state.pending["logits"])


@pytest.mark.parametrize("plus", [False, True])
def test_loss_and_step_equal_a_hand_computation(plus):
    # replay_batch == buffer_size with a full buffer: every row is replayed, so the replay
    # terms do not depend on which permutation was drawn
    cfg = der.Config(buffer_size=8, replay_batch=8)
    hp = der.HParamsPlus(lr=0.2, alpha=0.7, beta=0.4) if plus else der.HParams(lr=0.2, alpha=0.7)
    learner = (der.make_plus if plus else der.make)(MODEL, cfg)
    bs = batches()
    state, _ = run(learner, hp, 3, bs)
    state = state._replace(pending_valid=jnp.zeros(B, bool))  # no write this step
    assert int(reservoir.size(state.buffer)) == 8
    xb, yb, zb = (state.buffer.data[k] for k in ("x", "y", "logits"))
    b = step_of(bs, 3)

    def hand(params):
        loss = hand_ce(forward(params, b.x), b.y)
        loss += 0.7 * jnp.sum((forward(params, xb) - zb) ** 2) / (8 * C)
        if plus:
            loss += 0.4 * hand_ce(forward(params, xb), yb)
        return loss

    loss, grads = jax.value_and_grad(hand)(state.net.params)
    new, metrics = learner.update(state, b, hp, jax.random.PRNGKey(11))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    expected = jax.tree.map(lambda p, g: p - 0.2 * g, state.net.params, grads)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
                 new.net.params, expected)


def test_derpp_with_beta_zero_is_der():
    cfg = CFG
    d, _ = run(der.make(MODEL, cfg), der.HParams(lr=0.1, alpha=0.5), 6)
    p, _ = run(der.make_plus(MODEL, cfg), der.HParamsPlus(lr=0.1, alpha=0.5, beta=0.0), 6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), d, p)
    q, _ = run(der.make_plus(MODEL, cfg), der.HParamsPlus(lr=0.1, alpha=0.5, beta=0.5), 6)
    assert not np.allclose(q.net.params["Dense_1"]["bias"], d.net.params["Dense_1"]["bias"])


def test_der_with_alpha_zero_is_a_plain_stream_cross_entropy_step():
    learner = der.make(MODEL, CFG)
    bs = batches()
    state, _ = run(learner, der.HParams(), 3, bs)
    assert int(reservoir.size(state.buffer)) > 0
    b = step_of(bs, 3)
    loss, grads = jax.value_and_grad(lambda p: hand_ce(forward(p, b.x), b.y))(state.net.params)
    new, metrics = learner.update(state, b, der.HParams(lr=0.1, alpha=0.0), jax.random.PRNGKey(5))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    jax.tree.map(lambda a, p, g: np.testing.assert_allclose(a, p - 0.1 * g, rtol=1e-5,
                                                            atol=1e-6),
                 new.net.params, state.net.params, grads)
    with_alpha, m = learner.update(state, b, der.HParams(lr=0.1, alpha=1.0), jax.random.PRNGKey(5))
    assert float(m["loss"]) > float(loss)  # the logit term is on


def test_second_replay_batch_is_drawn_independently_of_the_first():
    cap, n, draws = 8, 3, 2000
    example = {"x": jnp.zeros((1, 1), jnp.int32), "y": jnp.zeros((1,), jnp.int32),
               "logits": jnp.zeros((1, C))}
    buf = reservoir.init(cap, example)
    buf = buf._replace(data={**buf.data, "x": jnp.arange(cap)[:, None]},
                       n_seen=jnp.int32(cap))  # row i holds x = i
    filler = jax.tree.map(lambda a: jnp.repeat(a, B, axis=0) - 1, example)

    def rows(key):
        (r1, m1), (r2, m2) = der.draw_replay(buf, key, n, filler, plus=True)
        (d1, _), none = der.draw_replay(buf, key, n, filler, plus=False)
        assert none is None
        return r1["x"][:, 0], r2["x"][:, 0], d1["x"][:, 0], m1 & m2

    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    first, second, der_first, valid = jax.jit(jax.vmap(rows))(keys)
    first, second = np.asarray(first), np.asarray(second)
    assert np.asarray(valid).all()
    np.testing.assert_array_equal(first, np.asarray(der_first))  # DER draws the same first
    assert all(len(set(r)) == n for r in first) and all(len(set(r)) == n for r in second)
    same = np.mean([set(a) == set(b) for a, b in zip(first, second, strict=True)])
    disjoint = np.mean([not set(a) & set(b) for a, b in zip(first, second, strict=True)])
    # independent uniform 3-subsets of 8 rows: P(same) = 1/56, P(disjoint) = C(5,3)/56 = 10/56
    assert same < 0.04
    assert abs(disjoint - 10 / 56) < 0.04
    # the second batch's row counts do not depend on the first batch: P(row r in second |
    # row 0 in first) is still n / cap
    has0 = (first == 0).any(1)
    cond = np.stack([(second == r).any(1)[has0].mean() for r in range(cap)])
    np.testing.assert_allclose(cond, n / cap, atol=0.07)
