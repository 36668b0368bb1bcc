"""Behaviour that makes CLS-ER that method (Arani et al. 2022, Sec. 3; NeurAI-Lab/CLS-ER
``models/clser.py``): per-row targets from the better of two EMA memories, a consistency term
on replayed rows beside ER's cross-entropy, stochastic EMA updates with a step-count warm-up,
and predictions from the stable memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_learner_contract import B, batches, step_of

from ocljax import models
from ocljax.errors import ConfigError
from ocljax.learners import clser, er
from ocljax.memory import reservoir

C = 4
MODEL = models.make_model("mlp", C, width=16, depth=1)
CFG = clser.Config(buffer_size=8, replay_batch=3)


def forward(params, x):
    return MODEL.apply(params, {}, x, True)[0]


def close(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **{"rtol": 1e-5, "atol": 1e-6,
                                                                  **kw}), a, b)


@functools.lru_cache
def learner_for(cfg, net=MODEL):
    """The learner and its jitted update, compiled once per config for the whole file."""
    learner = clser.make(net, cfg)
    return learner, jax.jit(learner.update)


def run(hp, n, cfg=CFG, bs=None):
    learner, update = learner_for(cfg)
    bs = batches() if bs is None else bs
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    for i in range(n):
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(100 + i))
    return learner, state


def test_targets_come_from_the_memory_more_confident_in_the_label():
    plastic = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    stable = jnp.array([[0.0, 3.0, 0.0], [0.0, 3.0, -1.0], [5.0, 5.0, 5.0]])
    y = jnp.array([0, 1, 2])
    got = clser.select_targets(plastic, stable, y)
    # row 0: plastic gives class 0 more; row 1: stable gives class 1 more (whole vector taken);
    # row 2: equal probabilities (1/3 each): the tie goes to the plastic model
    np.testing.assert_array_equal(got, jnp.stack([plastic[0], stable[1], plastic[2]]))


def test_ema_decay_warms_up_with_the_step_count():
    np.testing.assert_allclose(clser.ema_decay(jnp.array(1), 0.99), 0.5)
    np.testing.assert_allclose(clser.ema_decay(jnp.array(9), 0.99), 0.9)
    np.testing.assert_allclose(clser.ema_decay(jnp.array(1000), 0.99), 0.99)


# steps 1 and 3: the warm-up sets the decay (2/3, 0.8); step 50: each memory's own decay caps it
@pytest.mark.parametrize("step", [1, 3, 50])
def test_step_equals_a_hand_computation(step):
    # the stable memory is set to favour one class, the plastic memory trails the working
    # model: each replayed row picks its own target
    hp = clser.HParams(lr=0.2, reg_weight=1.5, plastic_rate=1.0, plastic_decay=0.9,
                       stable_rate=1.0, stable_decay=0.95)
    cfg = clser.Config(buffer_size=8, replay_batch=8)  # every stored row is replayed
    learner, state = run(hp, 3, cfg)
    xb, yb = state.buffer.data["x"], state.buffer.data["y"]
    # a stable memory that favours the first row's class: rows of that class take its
    # logits, the others the plastic model's
    last = sorted(state.stable.params)[-1]
    favour = state.stable.params[last]["bias"].at[int(yb[0])].add(2.0)
    stable = {**state.stable.params, last: {**state.stable.params[last], "bias": favour}}
    state = state._replace(pending_valid=jnp.zeros(B, bool), step=jnp.array(step),
                           stable=state.stable._replace(params=stable))
    assert int(reservoir.size(state.buffer)) == 8
    pl, st = forward(state.plastic.params, xb), forward(state.stable.params, xb)
    chosen = clser.select_targets(pl, st, yb)
    stable_wins = ~np.all(np.asarray(chosen) == np.asarray(pl), axis=1)
    assert 0 < stable_wins.sum() < 8  # both memories serve some rows
    b = step_of(batches(), 3)

    def hand(params):
        logits = forward(params, jnp.concatenate([b.x, xb]))
        y = jnp.concatenate([b.y, yb])
        logp = jax.nn.log_softmax(logits)
        ce = -jnp.mean(logp[jnp.arange(y.shape[0]), y])
        return ce + 1.5 * jnp.mean((logits[B:] - chosen) ** 2)

    loss, grads = jax.jit(jax.value_and_grad(hand))(state.net.params)
    new, metrics = learner_for(cfg)[1](state, b, hp, jax.random.PRNGKey(11))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    working = jax.tree.map(lambda p, g: p - 0.2 * g, state.net.params, grads)
    close(new.net.params, working)
    # both memories after the step, with the warm-up of step + 1 steps
    for old, moved, decay in ((state.plastic, new.plastic, 0.9),
                              (state.stable, new.stable, 0.95)):
        a = min(1 - 1 / (step + 2), decay)
        close(moved.params, jax.tree.map(lambda e, p, a=a: a * e + (1 - a) * p, old.params,
                                         working))
    assert int(new.step) == step + 1
    # online logits: the pre-update stable model on the incoming rows
    np.testing.assert_allclose(metrics["stream_logits"], forward(state.stable.params, b.x),
                               rtol=1e-5, atol=1e-6)


def test_rows_the_memory_does_not_hold_yet_are_out_of_both_losses():
    # 4 rows stored, 6 replayed: 2 filler rows, masked out of the cross-entropy and the
    # consistency term alike
    hp = clser.HParams(lr=0.2, reg_weight=1.5)
    cfg = clser.Config(buffer_size=8, replay_batch=6)
    learner, state = run(hp, 1, cfg)
    b = step_of(batches(), 1)
    key = jax.random.PRNGKey(11)
    flushed = er.flush(state, jax.random.split(jax.random.split(key)[0])[0])
    assert int(reservoir.size(flushed.buffer)) == B
    xb, yb = flushed.buffer.data["x"][:B], flushed.buffer.data["y"][:B]
    targets = clser.select_targets(forward(state.plastic.params, xb),
                                   forward(state.stable.params, xb), yb)

    def hand(params):
        logits = forward(params, jnp.concatenate([b.x, xb]))
        y = jnp.concatenate([b.y, yb])
        ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2 * B), y])
        return ce + 1.5 * jnp.mean((logits[B:] - targets) ** 2)

    _, metrics = learner_for(cfg)[1](state, b, hp, key)
    np.testing.assert_allclose(metrics["loss"], jax.jit(hand)(state.net.params), rtol=1e-5)


def test_without_consistency_the_working_model_is_er():
    hp = clser.HParams(reg_weight=0.0)
    _, state = run(hp, 5)
    ref = er.make(MODEL, er.Config(buffer_size=8, replay_batch=3))
    bs = batches()
    ref_state = ref.init(jax.random.PRNGKey(0), bs.x[0], er.HParams(lr=hp.lr))
    ref_update = jax.jit(ref.update)
    for i in range(5):
        k_er, _ = jax.random.split(jax.random.PRNGKey(100 + i))
        ref_state, _ = ref_update(ref_state, step_of(bs, i), er.HParams(lr=hp.lr), k_er)
    close(state.net.params, ref_state.net.params)
    np.testing.assert_array_equal(state.buffer.data["y"], ref_state.buffer.data["y"])
    # ... while the consistency term changes the working model
    _, other = run(clser.HParams(), 5)
    assert not np.allclose(other.net.params["Dense_0"]["kernel"],
                           state.net.params["Dense_0"]["kernel"], atol=1e-5)


def test_memories_update_with_independent_coins_at_their_rates():
    hp = clser.HParams(plastic_rate=0.5, stable_rate=0.25)
    learner = clser.make(MODEL, CFG)
    bs = batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    b = step_of(bs, 0)

    def body(state, key):
        new, _ = learner.update(state, b, hp, key)
        moved = lambda e, o: jnp.any(e.params["Dense_0"]["kernel"]  # noqa: E731
                                     != o.params["Dense_0"]["kernel"])
        return new, (moved(new.plastic, state.plastic), moved(new.stable, state.stable))

    keys = jax.random.split(jax.random.PRNGKey(3), 800)
    _, (p, s) = jax.lax.scan(body, state, keys)
    p, s = np.asarray(p), np.asarray(s)
    assert abs(p.mean() - 0.5) < 0.06 and abs(s.mean() - 0.25) < 0.05
    assert abs((p & s).mean() - 0.125) < 0.04  # independent coins


def test_predictions_come_from_the_stable_memory():
    learner, state = run(clser.HParams(stable_rate=0.5), 6)
    x = batches().x[0]
    np.testing.assert_allclose(learner.predict(state, x, None),
                               forward(state.stable.params, x), rtol=1e-6)
    assert not np.allclose(forward(state.net.params, x), forward(state.stable.params, x))
    feats = learner.features(state, x, None)
    np.testing.assert_allclose(feats, MODEL.apply(state.stable.params, {}, x, False)[1])


def test_batchnorm_memories_keep_their_own_statistics():
    net = models.make_model("cnn_bn", C, width=8)
    learner, update = learner_for(CFG, net)
    bs = batches()
    hp = clser.HParams()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    first, metrics = update(state, step_of(bs, 0), hp, jax.random.PRNGKey(1))
    assert metrics["stream_logits"] is None  # the driver scores predict on the stable memory
    # empty buffer: the memories ran no forward of their own
    close(first.stable.model_state, state.stable.model_state, rtol=0, atol=0)
    second, _ = update(first, step_of(bs, 1), hp, jax.random.PRNGKey(2))
    stats = lambda ms: np.concatenate([np.ravel(a) for a in jax.tree.leaves(ms)])  # noqa: E731
    assert not np.allclose(stats(second.stable.model_state), stats(first.stable.model_state))
    assert not np.allclose(stats(second.stable.model_state), stats(second.net.model_state))


def test_cli_refuses_rates_outside_the_unit_interval():
    from ocljax.cli import check_hparams
    with pytest.raises(ConfigError, match="stable_rate must be in"):
        check_hparams("clser", {"stable_rate": 1.5})
    with pytest.raises(ConfigError, match="reg_weight must be >= 0"):
        check_hparams("clser", {"reg_weight": -1.0})
