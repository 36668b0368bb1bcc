"""Behaviour that makes GDumb that method: no training on the stream, a balanced memory, and an
evaluation network trained from scratch on the memory alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_learner
from test_learner_contract import batches, step_of

from ocljax import models
from ocljax.learners import gdumb
from ocljax.learners.supervised import cross_entropy_step
from ocljax.memory import balanced
from ocljax.types import Batch

MODEL = models.make_model("mlp", 4, width=16, depth=1)


def batch_of(x, y, fresh=True, t=0):
    return Batch(jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.int32(0), jnp.asarray(False),
                 jnp.int32(t), jnp.asarray(fresh))


def toy(n_per_class, classes=(0, 1, 2, 3), seed=0):
    """Separable 4x4x1 images: class c lights up quadrant c (shuffled order)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(classes), n_per_class)
    x = rng.integers(0, 40, size=(len(y), 4, 4, 1))
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 2 * r:2 * r + 2, 2 * q:2 * q + 2] = rng.integers(200, 256, size=(2, 2, 1))
    perm = rng.permutation(len(y))
    return x[perm].astype(np.uint8), y[perm].astype(np.int32)


def test_update_only_writes_memory_and_never_trains():
    module, learner = tiny_learner("gdumb")
    hp, bs = module.HParams(), batches()
    key = jax.random.PRNGKey(0)
    state = learner.init(key, bs.x[0], hp)
    initial = state.net
    update = jax.jit(learner.update)
    for i in range(3):
        state, metrics = update(state, step_of(bs, i), hp, jax.random.PRNGKey(i))
        assert float(metrics["loss"]) == 0.0
    assert int(balanced.size(state.memory)) == 8 and int(state.memory.n_seen) == 12
    repeat = step_of(bs, 3)._replace(fresh=jnp.asarray(False))
    state, _ = update(state, repeat, hp, jax.random.PRNGKey(7))
    assert int(state.memory.n_seen) == 12  # a repeat pass is not offered to the memory
    jax.tree.map(np.testing.assert_array_equal, state.net, initial)  # bitwise untouched
    # online predictions are the untrained network's, unmasked
    raw = MODEL.apply(initial.params, initial.model_state, bs.x[4], False)[0]
    np.testing.assert_array_equal(learner.predict(state, bs.x[4], hp), raw)


@pytest.mark.parametrize("buffer_size", [8, 16])
def test_retraining_starts_fresh_and_follows_the_schedule(buffer_size):
    """8 filled rows, minibatches of 8: epoch e is one SGD step on the whole memory with the
    schedule's lr, starting from the initial network (reference: steps taken by hand). With 16
    rows of capacity, the second minibatch of each epoch holds no filled row: no step."""
    cfg = gdumb.Config(buffer_size=buffer_size, retrain_epochs=3, retrain_batch=8)
    learner = gdumb.make(MODEL, cfg)
    hp = gdumb.HParams(lr=0.3, min_lr=0.01)
    x, y = toy(2)
    state = learner.init(jax.random.PRNGKey(3), x[:4], hp)
    state, _ = learner.update(state, batch_of(x, y), hp, jax.random.PRNGKey(4))
    prepared = learner.prepare_eval(state, hp, jax.random.PRNGKey(5))
    net = state.net
    for lr in (0.03, 0.3, 0.3):  # warm-up at lr / 10, then SGDR restarts at epochs 1 and 2
        net, _, _ = cross_entropy_step(MODEL, "sgd", net, jnp.asarray(x), jnp.asarray(y), None,
                                       lr)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 prepared.net.params, net.params)


def test_epoch_lr_is_warmup_then_cosine_with_warm_restarts():
    lr, lo = 0.05, 0.0005
    half = lo + (lr - lo) * 0.5
    expected = [0.005, lr, lr, half, lr,
                lo + (lr - lo) * (1 + np.cos(np.pi / 4)) / 2, half,
                lo + (lr - lo) * (1 + np.cos(3 * np.pi / 4)) / 2, lr]
    got = [float(gdumb.epoch_lr(jnp.int32(e), lr, lo)) for e in range(9)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert float(gdumb.epoch_lr(jnp.int32(5), lr, lo, "constant")) == np.float32(lr)


def test_evaluation_model_depends_only_on_the_memory():
    cfg = gdumb.Config(buffer_size=8, retrain_epochs=3, retrain_batch=4)
    learner = gdumb.make(MODEL, cfg)
    hp = gdumb.HParams()
    x, y = toy(6, seed=1)
    order = np.argsort(y, kind="stable")
    first = np.concatenate([order[c * 6:c * 6 + 2] for c in range(4)])  # 2 per class: full
    rest = np.setdiff1d(np.arange(len(y)), first)  # all rejected: each class holds its share
    b0, b1, b2 = first, rest[:8], rest[8:]
    key = jax.random.PRNGKey(0)
    update, prepare = jax.jit(learner.update), jax.jit(learner.prepare_eval)

    def run(parts, seed):
        state = learner.init(key, x[:4], hp)
        for i, p in enumerate(parts):
            state, _ = update(state, batch_of(x[p], y[p]), hp, jax.random.PRNGKey(seed + i))
        return state

    a, b = run([b0, b1, b2], 10), run([b0, b2[::-1], b1], 20)
    jax.tree.map(np.testing.assert_array_equal, a.memory.data, b.memory.data)
    pa = prepare(a, hp, jax.random.PRNGKey(1))
    pb = prepare(b, hp, jax.random.PRNGKey(2))
    probe = jnp.asarray(toy(3, seed=9)[0])
    np.testing.assert_array_equal(learner.predict(pa, probe, hp), learner.predict(pb, probe, hp))
    # and the retrained network is not the initial one
    assert not np.allclose(pa.net.params["Dense_0"]["kernel"], a.net.params["Dense_0"]["kernel"])


def test_unfilled_rows_play_no_part_in_retraining():
    cfg = gdumb.Config(buffer_size=16, retrain_epochs=2, retrain_batch=4)
    learner = gdumb.make(MODEL, cfg)
    hp = gdumb.HParams()
    x, y = toy(2, classes=(1, 2), seed=2)
    state = learner.init(jax.random.PRNGKey(0), x[:4], hp)
    state, _ = learner.update(state, batch_of(x[:2], y[:2]), hp, jax.random.PRNGKey(1))
    state, _ = learner.update(state, batch_of(x[2:], y[2:]), hp, jax.random.PRNGKey(1))
    assert int(balanced.size(state.memory)) == 4  # rows 4..15 unfilled
    data = state.memory.data
    junk = {"x": data["x"].at[4:].set(255), "y": data["y"].at[4:].set(0)}  # class 0: absent
    other = state._replace(memory=state.memory._replace(data=junk))
    p1 = learner.prepare_eval(state, hp, jax.random.PRNGKey(2))
    p2 = learner.prepare_eval(other, hp, jax.random.PRNGKey(2))
    jax.tree.map(np.testing.assert_array_equal, p1.net, p2.net)


def test_retrained_network_fits_a_separable_memory():
    cfg = gdumb.Config(buffer_size=16, retrain_epochs=32, retrain_batch=4)
    learner = gdumb.make(MODEL, cfg)
    hp = gdumb.HParams(lr=0.5, min_lr=0.005)
    x, y = toy(10, seed=3)
    state = learner.init(jax.random.PRNGKey(0), x[:4], hp)
    update = jax.jit(learner.update)
    for i in range(len(y) // 4):
        state, _ = update(state, batch_of(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]), hp,
                          jax.random.PRNGKey(i))
    np.testing.assert_array_equal(balanced.class_counts(state.memory), [4, 4, 4, 4])
    mem_x, mem_y = state.memory.data["x"], np.asarray(state.memory.data["y"])
    before = (np.argmax(learner.predict(state, mem_x, hp), -1) == mem_y).mean()
    prepared = jax.jit(learner.prepare_eval)(state, hp, jax.random.PRNGKey(1))
    after = (np.argmax(learner.predict(prepared, mem_x, hp), -1) == mem_y).mean()
    assert after >= 0.9 > before + 0.3, (before, after)


def test_predictions_never_pick_classes_absent_from_memory():
    cfg = gdumb.Config(buffer_size=8, retrain_epochs=2, retrain_batch=4)
    learner = gdumb.make(MODEL, cfg)
    hp = gdumb.HParams()
    x, y = toy(4, classes=(1, 3), seed=4)
    state = learner.init(jax.random.PRNGKey(0), x[:4], hp)
    state, _ = learner.update(state, batch_of(x, y), hp, jax.random.PRNGKey(1))
    prepared = learner.prepare_eval(state, hp, jax.random.PRNGKey(2))
    probe = np.random.default_rng(0).integers(0, 256, size=(64, 4, 4, 1)).astype(np.uint8)
    probe = np.concatenate([probe, toy(8, classes=(0, 2), seed=5)[0]])
    logits = np.asarray(learner.predict(prepared, jnp.asarray(probe), hp))
    assert set(np.argmax(logits, -1).tolist()) <= {1, 3}
    assert np.isneginf(logits[:, [0, 2]]).all() and np.isfinite(logits[:, [1, 3]]).all()
