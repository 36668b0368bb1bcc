"""Behaviour that makes MAS (task-free) that method: importance, penalty, plateau rule."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_learner_contract import B, batches, step_of

from ocljax import learners, models
from ocljax.errors import ConfigError
from ocljax.learners import mas
from ocljax.learners.supervised import cross_entropy_step

K = 5  # hard buffer in these tests
NEVER = dict(mean_threshold=-1.0, var_threshold=-1.0)  # losses are >= 0: never consolidate
ALWAYS = dict(mean_threshold=1e9, var_threshold=1e9)  # consolidate whenever a peak was seen


MODEL = models.make_model("mlp", 4, width=16, depth=1)
KEY = jax.random.PRNGKey(0)
DETECT = jax.jit(mas.detect)
IMPORTANCE = jax.jit(mas.importance, static_argnums=0)
CONSOLIDATE = jax.jit(mas.consolidate, static_argnums=0)


class Jitted(NamedTuple):
    init: object
    update: object


@functools.lru_cache
def build(**cfg):
    """The tiny model and a MAS learner whose init / update are jitted (compiled once per
    config; hyperparameters are traced, so every HParams value reuses the compilation)."""
    learner = mas.make(MODEL, mas.Config(**{"hard_buffer_size": K, "window": 3, **cfg}))
    return MODEL, Jitted(jax.jit(learner.init), jax.jit(learner.update))


def hparams(**kw):
    return jax.tree.map(jnp.float32, mas.HParams(**kw))


def run(learner, hp, n, bs=None):
    bs = batches() if bs is None else bs
    state, out = learner.init(KEY, bs.x[0], hp), []
    for i in range(n):
        state, m = learner.update(state, step_of(bs, i), hp, KEY)
        out.append(m)
    return state, out


@functools.lru_cache
def row_grad(model):
    """d sum(logits(x_k)^2) / d theta for one row, evaluation mode (jitted)."""
    def sq(p, model_state, xk):
        logits = model.apply(p, model_state, xk[None], False)[0]
        return jnp.sum(logits ** 2)

    return jax.jit(jax.grad(sq))


def reference_importance(model, params, model_state, x, valid):
    """Mean over valid rows of |d sum(logits^2) / d theta|, one jax.grad call per row."""
    grads = [row_grad(model)(params, model_state, x[k]) for k in range(x.shape[0])
             if bool(valid[k])]
    return jax.tree.map(lambda *g: np.mean([np.abs(np.asarray(a)) for a in g], axis=0), *grads)


def close(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw),
                 a, b)


def reference_rule(losses, window, mean_thr, var_thr):
    """The authors' rule on python lists, float64: indices where consolidation fires."""
    win, peak, last_mean, last_var, fires = [], True, None, None, []
    for i, loss in enumerate(losses):
        win.append(loss)
        if len(win) > window:
            del win[0]
        mean, var = np.mean(win), np.var(win)
        if not peak and mean > last_mean + np.sqrt(last_var):
            peak = True
        if mean < mean_thr and var < var_thr and peak:
            fires.append(i)
            last_mean, last_var, peak = mean, var, False
    return fires


def drive(losses, window, mean_thr, var_thr):
    det, fires = mas.init_detector(window), []
    for i, loss in enumerate(losses):
        det, fire = DETECT(det, jnp.float32(loss), mean_thr, var_thr)
        if bool(fire):
            fires.append(i)
    return fires


def test_detector_fires_exactly_when_the_window_meets_the_rule():
    seq = [2.0, 1.0, 0.3, 0.3, 0.3,  # plateau after the initial drop: fires at 4
           0.3, 0.2, 0.2,  # still low and flat, but no new peak: no firing
           1.0, 0.2, 0.2,  # a peak (mean .47 > .3), but the window's variance is too high
           0.2,  # flat again at .2 after the peak: fires at 11
           0.9, 0.9, 0.9,  # peak; mean too high
           0.45, 0.0, 0.0,  # mean low but variance .045 > .01: no firing
           0.0]  # [0, 0, 0]: fires at 18
    assert drive(seq, 3, 0.5, 0.01) == [4, 11, 18]
    assert reference_rule(seq, 3, 0.5, 0.01) == [4, 11, 18]
    # a low, flat loss from the start fires once, then never again without a peak
    assert drive([0.1] * 10, 3, 0.5, 0.01) == [0]


def test_detector_matches_the_reference_rule_on_random_phases():
    rng = np.random.default_rng(0)
    seq = []
    for phase in range(40):  # alternating high and low phases, values on a 1/4 grid
        values = [0.0, 0.25] if phase % 2 else [1.0, 1.5, 2.0]
        seq += list(rng.choice(values, size=rng.integers(2, 12)))
    expected = reference_rule(seq, 4, 0.3, 0.02)
    assert len(expected) >= 5
    assert drive(seq, 4, 0.3, 0.02) == expected


def test_detector_disabled_pushes_nothing_and_never_fires():
    det = mas.init_detector(3)
    new, fire = DETECT(det, 0.0, 1.0, 1.0, False)
    assert not bool(fire)
    close(new, det, rtol=0, atol=0)
    _, fire = DETECT(det, 0.0, 1.0, 1.0, True)
    assert bool(fire)


def test_importance_is_the_mean_absolute_gradient_of_the_squared_logit_norm():
    model, learner = build()
    hp = hparams()
    state, _ = run(learner, hp, 2)
    x = batches().x[3]
    valid = jnp.array([True, False, True, True])
    got = IMPORTANCE(model, state.net, x, valid)
    want = reference_importance(model, state.net.params, state.net.model_state, x, valid)
    close(got, want, rtol=1e-5, atol=1e-7)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(got))


def test_consolidation_sets_omega_over_the_hard_buffer_and_anchors():
    model, learner = build()
    hp = hparams(**NEVER)
    state, _ = run(learner, hp, 3)
    assert int(state.n_consolidations) == 0 and bool(state.hard_valid.all())
    before = state
    hp_fire = hparams(**ALWAYS)  # the detector has seen no consolidation: peak is set
    state, m = learner.update(state, step_of(batches(), 3), hp_fire, KEY)
    assert bool(m["consolidated"]) and int(state.n_consolidations) == 1
    close(state.anchor, state.net.params, rtol=0, atol=0)  # theta* = post-step parameters
    want = reference_importance(model, state.net.params, state.net.model_state,
                                before.hard["x"], before.hard_valid)
    close(state.omega, want, rtol=1e-5, atol=1e-7)
    # a second consolidation folds in a cumulative moving average: (O1 + O2) / 2
    again = CONSOLIDATE(model, state, jnp.asarray(True))
    o2 = reference_importance(model, state.net.params, state.net.model_state,
                              state.hard["x"], state.hard_valid)
    close(again.omega, jax.tree.map(lambda a, b: (np.asarray(a) + b) / 2, state.omega, o2),
          rtol=1e-5, atol=1e-7)
    assert int(again.n_consolidations) == 2
    untouched = CONSOLIDATE(model, state, jnp.asarray(False))
    close(untouched, state, rtol=0, atol=0)


def test_lam_zero_without_consolidation_is_a_plain_ce_step_on_stream_and_hard_rows():
    model, learner = build()
    hp = hparams(lam=0.0, **NEVER)
    state, _ = run(learner, hp, 3)
    # a non-trivial importance and anchor, which lam = 0 must ignore
    state = state._replace(
        omega=jax.tree.map(lambda p: jnp.ones_like(p) * 3.0, state.net.params),
        anchor=jax.tree.map(lambda p: p + 1.0, state.net.params))
    b = step_of(batches(), 3)
    new, m = learner.update(state, b, hp, KEY)
    x = jnp.concatenate([b.x, state.hard["x"]])
    y = jnp.concatenate([b.y, state.hard["y"]])
    mask = jnp.concatenate([jnp.ones(B, bool), state.hard_valid])
    step = jax.jit(cross_entropy_step, static_argnums=(0, 1))
    net, loss, logits = step(model, "sgd", state.net, x, y, mask, hp.lr)
    close(new.net.params, net.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(m["stream_logits"], logits[:B], rtol=1e-6)
    assert int(new.n_consolidations) == 0


def test_penalty_gradient_is_two_lam_omega_times_distance_to_anchor():
    _, learner = build()
    state, _ = run(learner, hparams(**NEVER), 3)
    rng = np.random.default_rng(1)
    omega = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0, 2, p.shape), jnp.float32),
                         state.net.params)
    anchor = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(0, 0.1, p.shape), jnp.float32),
                          state.net.params)
    state = state._replace(omega=omega, anchor=anchor)
    b, lr, lam = step_of(batches(), 3), 0.1, 0.7
    plain, _ = learner.update(state, b, hparams(lr=lr, lam=0.0, **NEVER), KEY)
    reg, _ = learner.update(state, b, hparams(lr=lr, lam=lam, **NEVER), KEY)
    # SGD: the two steps differ by -lr * 2 lam Omega (theta - theta*)
    want = jax.tree.map(
        lambda p, o, a: -lr * 2 * lam * np.asarray(o) * (np.asarray(p) - np.asarray(a)),
        state.net.params, omega, anchor)
    got = jax.tree.map(lambda r, p: np.asarray(r) - np.asarray(p), reg.net.params,
                       plain.net.params)
    close(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        mas.penalty(state.net.params, anchor, omega),
        sum(float((np.asarray(o) * (np.asarray(p) - np.asarray(a)) ** 2).sum())
            for p, o, a in zip(*map(jax.tree.leaves, (state.net.params, omega, anchor)),
                               strict=True)), rtol=1e-5)


def test_learner_consolidates_exactly_where_its_losses_meet_the_rule():
    _, learner = build()
    hp = hparams(mean_threshold=1.6, var_threshold=0.05)
    bs = batches(n=24, seed=3)
    state, ms = run(learner, hp, 24, bs=bs)
    losses = [float(m["loss"]) for m in ms]
    fired = [i for i, m in enumerate(ms) if bool(m["consolidated"])]
    # the first step (empty hard buffer) pushes no loss: the rule sees steps 1, 2, ...
    assert fired == [i + 1 for i in reference_rule(losses[1:], 3, 1.6, 0.05)]
    assert len(fired) >= 1 and int(state.n_consolidations) == len(fired)


def test_hard_buffer_keeps_the_highest_loss_rows_and_is_replayed():
    model, learner = build()
    hp = hparams(**NEVER)
    state, _ = run(learner, hp, 2)
    b = step_of(batches(), 2)
    x = np.concatenate([b.x, state.hard["x"]])
    y = np.concatenate([b.y, state.hard["y"]])
    logits = model.apply(state.net.params, state.net.model_state, jnp.asarray(x), True)[0]
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    new, m = learner.update(state, b, hp, KEY)
    # the loss reported is over the stream and the (full) hard buffer rows
    np.testing.assert_allclose(m["loss"], ce.mean(), rtol=1e-5)
    top = np.argsort(-ce)[:K]
    assert sorted(map(tuple, np.asarray(new.hard["x"]).reshape(K, -1).tolist())) == sorted(
        map(tuple, x[top].reshape(K, -1).tolist()))
    assert bool(new.hard_valid.all())
    # a repeat pass offers no stream rows and pushes no loss into the window
    rep, _ = learner.update(new, step_of(batches(), 3)._replace(fresh=jnp.asarray(False)), hp,
                            KEY)
    assert int(rep.detector.filled) == int(new.detector.filled)
    assert sorted(map(tuple, np.asarray(rep.hard["x"]).reshape(K, -1).tolist())) == sorted(
        map(tuple, np.asarray(new.hard["x"]).reshape(K, -1).tolist()))


def test_first_step_fills_the_hard_buffer_with_what_it_has():
    _, learner = build()
    state, _ = run(learner, hparams(**NEVER), 1)
    assert K > B and int(state.hard_valid.sum()) == B  # 4 stream rows for 5 slots


def test_boundary_mode_consolidates_at_fresh_boundaries_only():
    model, learner = build(consolidate="boundary")
    hp = hparams(**ALWAYS)  # thresholds are ignored in this mode
    bs = batches()  # boundaries at steps 0 (hard buffer still empty: skipped) and 3
    state = learner.init(KEY, bs.x[0], hp)
    counts = []
    for i in range(6):
        before = state
        state, m = learner.update(state, step_of(bs, i), hp, KEY)
        counts.append(int(state.n_consolidations))
        if i == 3:  # consolidated before the step, at the end-of-task parameters
            close(state.anchor, before.net.params, rtol=0, atol=0)
            want = reference_importance(model, before.net.params, before.net.model_state,
                                        before.hard["x"], before.hard_valid)
            close(state.omega, want, rtol=1e-5, atol=1e-7)
    assert counts == [0, 0, 0, 1, 1, 1]
    repeat = step_of(bs, 3)._replace(fresh=jnp.asarray(False))
    again, _ = learner.update(state, repeat, hp, KEY)
    assert int(again.n_consolidations) == 1


def test_boundary_mode_needs_boundaries_and_plateau_does_not():
    assert mas.requires_boundaries(mas.Config(consolidate="boundary"))
    assert not mas.requires_boundaries(mas.Config())
    learners.check_stream("mas", True)  # the default is task-free
    with pytest.raises(ConfigError, match="task boundaries"):
        learners.check_stream("mas", True, mas.Config(consolidate="boundary"))


@pytest.mark.parametrize("bad", [dict(hard_buffer_size=0), dict(window=0),
                                 dict(consolidate="task"), dict(optimizer="rmsprop")])
def test_check_config_rejects_impossible_settings(bad):
    with pytest.raises(ConfigError):
        mas.check_config(mas.Config(**bad))
