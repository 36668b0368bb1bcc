"""Behaviour that makes ER-MIR that method: replay the candidates a virtual step hurts most."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_learner
from test_learner_contract import B, batches, step_of

from ocljax import models
from ocljax.errors import ConfigError
from ocljax.learners import er, mir
from ocljax.learners.supervised import cross_entropy_step
from ocljax.memory import reservoir
from ocljax.models import to_float
from ocljax.types import Model

MODEL = models.make_model("mlp", 4, width=16, depth=1)
CFG = mir.Config(buffer_size=8, replay_batch=3, candidates=6)  # the contract suite's sizes
LEARNER = mir.make(MODEL, CFG)
UPDATE = jax.jit(LEARNER.update)
RETRIEVE = jax.jit(lambda *a: mir.retrieve(MODEL, CFG, *a))
SGD = jax.jit(lambda *a: cross_entropy_step(MODEL, "sgd", *a))
FLUSH = jax.jit(er.flush)
READ = jax.jit(er.replay_rows, static_argnums=2)


# --- a hand-written numpy reference for the 1-hidden-layer MLP ------------------------------

def np_params(params):
    return {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}


def np_forward(p, x):
    x = np.asarray(x, np.float64).reshape(len(x), -1) / 255.0
    h = np.maximum(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0.0)
    return x, h, h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def np_ce_rows(logits, y):
    m = logits.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
    return lse - logits[np.arange(len(y)), y]


def np_sgd_step(p, x, y, lr):
    """Backpropagation of the mean cross-entropy by hand; returns ``p - lr * grad``."""
    xf, h, logits = np_forward(p, x)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    d = (prob - np.eye(logits.shape[1])[y]) / len(y)
    dh = (d @ p["Dense_1"]["kernel"].T) * (h > 0)
    grads = {"Dense_1": {"kernel": h.T @ d, "bias": d.sum(0)},
             "Dense_0": {"kernel": xf.T @ dh, "bias": dh.sum(0)}}
    return {k: {n: p[k][n] - lr * grads[k][n] for n in p[k]} for k in p}


def reference_scores(params, stream, cands, lr):
    p = np_params(params)
    pv = np_sgd_step(p, np.asarray(stream["x"]), np.asarray(stream["y"]), lr)
    y = np.asarray(cands["y"])
    before = np_ce_rows(np_forward(p, cands["x"])[2], y)
    after = np_ce_rows(np_forward(pv, cands["x"])[2], y)
    return after - before, before


def warm_state(hp, bs, n_steps):
    state = LEARNER.init(jax.random.PRNGKey(0), bs.x[0], hp)
    for i in range(n_steps):
        state, _ = UPDATE(state, step_of(bs, i), hp, jax.random.PRNGKey(100 + i))
    return state


def assert_trees_close(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw),
                 a, b)


# --- tests -----------------------------------------------------------------------------------

def test_replays_exactly_the_top_k_candidates_by_loss_increase():
    hp, bs = mir.HParams(lr=0.5), batches()
    state = warm_state(hp, bs, 3)
    batch, key = step_of(bs, 3), jax.random.PRNGKey(7)

    # what the update sees: the pending batch written, then C candidates drawn
    k_write, k_read = jax.random.split(key)
    flushed = FLUSH(state, k_write)
    assert int(reservoir.size(flushed.buffer)) == 8
    stream = {"x": batch.x, "y": batch.y}
    cands, cand_mask = READ(flushed.buffer, k_read, 6, stream)
    assert bool(cand_mask.all())

    scores, before = reference_scores(state.net.params, stream, cands, hp.lr)
    top = np.argsort(-scores)[:3]
    # the choice is informative: not the first k drawn, nor the k largest current losses
    assert set(top) != {0, 1, 2}
    assert set(top) != set(np.argsort(-before)[:3])

    rows, mask, _, _, got_scores = RETRIEVE(flushed.net, flushed.buffer, stream, k_read, hp.lr)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-4, atol=1e-5)
    assert bool(mask.all())
    np.testing.assert_array_equal(np.sort(np.asarray(rows["y"])),
                                  np.sort(np.asarray(cands["y"])[top]))

    # the real step: one SGD step from theta on stream + those rows, nothing else
    new, metrics = UPDATE(state, batch, hp, key)
    x = jnp.concatenate([batch.x, cands["x"][top]])
    y = jnp.concatenate([batch.y, cands["y"][top]])
    ref, ref_loss, ref_logits = SGD(state.net, x, y, jnp.ones(B + 3, bool), hp.lr)
    assert_trees_close(new.net.params, ref.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["stream_logits"], ref_logits[:B], rtol=1e-5, atol=1e-6)


def test_buffer_smaller_than_k_selects_only_real_rows():
    hp, bs = mir.HParams(), batches()
    state = LEARNER.init(jax.random.PRNGKey(0), bs.x[0], hp)
    two = {"x": bs.x[0], "y": bs.y[0]}
    buffer = reservoir.add(state.buffer, two, jax.random.PRNGKey(1),
                           jnp.array([True, True, False, False]))
    state = state._replace(buffer=buffer)
    assert int(reservoir.size(buffer)) == 2
    batch, key = step_of(bs, 1), jax.random.PRNGKey(3)
    stream = {"x": batch.x, "y": batch.y}

    _, k_read = jax.random.split(key)
    rows, mask, _, cand_mask, scores = RETRIEVE(state.net, buffer, stream, k_read, hp.lr)
    assert int(cand_mask.sum()) == 2 and int(mask.sum()) == 2
    assert np.isneginf(np.asarray(scores)[~np.asarray(cand_mask)]).all()
    real = np.asarray(rows["x"])[np.asarray(mask)]
    expected = np.asarray(bs.x[0][:2])
    assert sorted(r.tobytes() for r in real) == sorted(r.tobytes() for r in expected)

    # the update trains on the stream and exactly the two stored rows (a third, masked row of
    # zeros keeps the reference batch the same shape)
    new, metrics = UPDATE(state, batch, hp, key)
    x = jnp.concatenate([batch.x, bs.x[0][:2], jnp.zeros_like(bs.x[0][:1])])
    y = jnp.concatenate([batch.y, bs.y[0][:2], bs.y[0][:1]])
    m = jnp.arange(B + 3) < B + 2
    ref, ref_loss, _ = SGD(state.net, x, y, m, hp.lr)
    assert_trees_close(new.net.params, ref.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)


def counting_model() -> Model:
    """A linear model whose state, like BatchNorm statistics, changes on every training-mode
    forward pass: it counts them and the rows they saw."""

    def init(key, x):
        params = {"w": 0.1 * jax.random.normal(key, (int(np.prod(x.shape[1:])), 4)),
                  "b": jnp.zeros(4)}
        return params, {"passes": jnp.zeros((), jnp.int32), "rows": jnp.zeros((), jnp.int32)}

    def apply(params, state, x, train):
        h = to_float(x).reshape(x.shape[0], -1)
        if train:
            state = {"passes": state["passes"] + 1, "rows": state["rows"] + x.shape[0]}
        return h @ params["w"] + params["b"], h, state

    return Model(init, apply, 4, 16)


def test_virtual_step_and_scoring_leave_the_model_state_alone():
    learner = mir.make(counting_model(), CFG)
    hp, bs = mir.HParams(), batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    stored = {"x": bs.x[:2].reshape(2 * B, 4, 4, 1), "y": bs.y[:2].reshape(2 * B)}
    state = state._replace(buffer=reservoir.add(state.buffer, stored, jax.random.PRNGKey(1)))
    new, _ = jax.jit(learner.update)(state, step_of(bs, 2), hp, jax.random.PRNGKey(5))
    # one virtual step and two scoring passes ran, but only the real step's pass counts
    assert int(new.net.model_state["passes"]) == 1
    assert int(new.net.model_state["rows"]) == B + CFG.replay_batch


def test_empty_buffer_first_step_is_plain_sgd():
    fmod, finetune = tiny_learner("finetune")
    bs, key = batches(), jax.random.PRNGKey(1)
    f = finetune.init(key, bs.x[0], fmod.HParams())
    m = LEARNER.init(key, bs.x[0], mir.HParams())
    f, fm = jax.jit(finetune.update)(f, step_of(bs, 0), fmod.HParams(), key)
    m, mm = UPDATE(m, step_of(bs, 0), mir.HParams(), key)
    assert_trees_close(f.params, m.net.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fm["loss"], mm["loss"], rtol=1e-6)


@pytest.mark.parametrize("kw", [dict(candidates=2, replay_batch=3),
                                dict(candidates=9, buffer_size=8)])
def test_impossible_sizes_are_refused(kw):
    cfg = dict(buffer_size=8, replay_batch=3, candidates=6) | kw
    with pytest.raises(ConfigError, match="candidates"):
        mir.check_config(mir.Config(**cfg))
