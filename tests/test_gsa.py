"""Behaviour that makes GSA that method (Guo et al. CVPR 2023; gydpku/GSA test_cifar100.py):
incoming rows trained on the current task's classes only, a memory batch split between other
tasks and current rows by the share of current classes, running per-class gradient sums, and
memory rows weighted by 2 / (1 + exp(1 - ANT)) after each task's first 5 steps."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocljax import models
from ocljax.learners import er, gsa
from ocljax.types import Batch

C, B = 4, 4
MODEL = models.make_model("mlp", C, width=16, depth=1)
# labels {0, 1} in task 0 (steps 0-2), {2, 3} in task 1 (steps 3-5)
LABELS = np.array([[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1],
                   [2, 3, 3, 2], [3, 2, 2, 3], [2, 2, 3, 3]], np.int32)


def stream(labels=LABELS):
    rng = np.random.default_rng(0)
    n = labels.shape[0]
    return Batch(x=jnp.asarray(rng.integers(0, 255, (n, B, 4, 4, 1), dtype=np.uint8)),
                 y=jnp.asarray(labels), task=jnp.asarray(np.arange(n) // 3, jnp.int32),
                 boundary=jnp.asarray((np.arange(n) % 3 == 0) & (np.arange(n) > 0)),
                 t=jnp.arange(n, dtype=jnp.int32), fresh=jnp.ones((n,), bool))


def step_of(bs, i):
    return jax.tree.map(lambda a: a[i], bs)


def forward(params, x):
    return MODEL.apply(params, {}, x, True)[0]


def test_class_weights_follow_the_positive_to_negative_gradient_ratio():
    stats = gsa.Stats(count=jnp.array([10.0, 10.0, 0.0, 4.0]),
                      pos=jnp.array([8.0, 2.0, 0.0, 2.0]), neg=jnp.array([1.0, 16.0, 0.0, 2.0]))
    w = np.asarray(gsa.class_weights(stats))
    ant = np.array([2.0, 0.5, np.nan, 1.0])
    np.testing.assert_allclose(w[[0, 1, 3]], 2 / (1 + np.exp(1 - ant[[0, 1, 3]])), rtol=1e-6)
    # more positive than negative push: above 1; less: below 1; balance: 1; no negative mass: 1
    assert w[0] > 1 > w[1] and w[3] == pytest.approx(1.0) and w[2] == 1.0


def test_accumulate_sums_detached_probabilities_per_class():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, C)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 1])
    valid = np.array([1, 1, 1, 1, 0, 1], bool)
    seen = np.array([1, 1, 1, 0], bool)
    zero = jnp.zeros(C)
    got = gsa.accumulate(gsa.Stats(zero + 1, zero + 2, zero + 3), jnp.asarray(logits),
                         jnp.asarray(y), jnp.asarray(valid), jnp.asarray(seen))
    e = np.exp(logits[:, :3] - logits[:, :3].max(1, keepdims=True))
    p = np.zeros_like(logits)
    p[:, :3] = e / e.sum(1, keepdims=True)
    count, pos, neg = np.ones(C), np.full(C, 2.0), np.full(C, 3.0)
    for i in np.flatnonzero(valid):
        count[y[i]] += 1
        pos[y[i]] += p[i, y[i]]
        neg += p[i] * (np.arange(C) != y[i])
    for a, b in zip(got, (count, pos, neg), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


@functools.lru_cache
def learner_for(cfg, net=MODEL):
    """The learner and its jitted update, compiled once per config for the whole file."""
    learner = gsa.make(net, cfg)
    return learner, jax.jit(learner.update)


def run(cfg, n, hp=None, labels=LABELS):
    hp = gsa.HParams() if hp is None else hp
    learner, update = learner_for(cfg)
    bs = stream(labels)
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    for i in range(n):
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(100 + i))
    return learner, state, bs


def hand_loss(params, new_x, new_y, current, mem_x, mem_y, seen, weights, buffer_weight):
    """2 L_buf + L_new written out: cross-entropy over the current classes on the new rows,
    weighted cross-entropy over the seen classes on the memory rows."""
    def ce(logits, y, classes):
        logits = jnp.where(classes, logits, -1e9)
        logp = jax.nn.log_softmax(logits)
        return -logp[jnp.arange(y.shape[0]), y]

    l_new = ce(forward(params, new_x), new_y, current).mean()
    if mem_x is None:
        return l_new
    l_buf = (weights[mem_y] * ce(forward(params, mem_x), mem_y, seen)).mean()
    return buffer_weight * l_buf + l_new


@pytest.mark.parametrize("flip_copy", [False, True])
# task_step None: the stream's own (0 at step 3, 1 at step 4); 4: the warm-up's last step; 5:
# the first weighted one
@pytest.mark.parametrize("step,task_step", [(3, None), (4, None), (4, 4), (4, 5)])
def test_step_rows_and_loss_equal_a_hand_computation(step, task_step, flip_copy):
    # no augmentation and every eligible row drawn: the row sets are determined
    cfg = gsa.Config(buffer_size=32, memory_batch=32, current_replay=8, augment="none",
                     flip_copy=flip_copy)
    hp = gsa.HParams(lr=1e-3, buffer_weight=2.0)
    learner, state, bs = run(cfg, step, hp)
    if task_step is not None:
        state = state._replace(task_step=jnp.array(task_step, jnp.int32))
    key = jax.random.PRNGKey(11)
    flushed = er.flush(state, jax.random.split(key, 6)[0])
    assert int(flushed.buffer.n_seen) == 4 * step  # all stored, in order
    data = jax.tree.map(lambda a: a[:4 * step], flushed.buffer.data)
    b = step_of(bs, step)
    stored_task = np.asarray(data["task"])
    np.testing.assert_array_equal(stored_task, np.repeat(np.arange(step) // 3, B))
    in_task = stored_task == 1
    # step 3 opens task 1: no current-task memory rows yet (and none stored); step 4 joins
    # batch 3's rows, already in memory, to the incoming ones
    new_x = np.concatenate([np.asarray(b.x), np.asarray(data["x"])[in_task]])
    new_y = np.concatenate([np.asarray(b.y), np.asarray(data["y"])[in_task]])
    # rate = |{2, 3}| / |{0, 1, 2, 3}| = 1/2: 16 rows from task 0 (all 12 stored) and the first
    # 16 of the new rows (all of them)
    mem_x = np.concatenate([np.asarray(data["x"])[~in_task], new_x])
    mem_y = np.concatenate([np.asarray(data["y"])[~in_task], new_y])
    seen = jnp.ones(C, bool)
    current = jnp.array([False, False, True, True])
    if flip_copy:
        new_x, new_y = np.concatenate([new_x, new_x[:, :, ::-1]]), np.tile(new_y, 2)
        mem_x, mem_y = np.concatenate([mem_x, mem_x[:, :, ::-1]]), np.tile(mem_y, 2)
    mem_logits = forward(state.net.params, jnp.asarray(mem_x))
    stats = gsa.accumulate(state.stats, mem_logits, jnp.asarray(mem_y),
                           jnp.ones(len(mem_y), bool), seen)
    warm = task_step is None or task_step < 5  # the task's first 5 steps: all weights 1
    weights = jnp.ones(C) if warm else gsa.class_weights(stats)
    if not warm:
        assert not np.allclose(weights, 1.0, atol=1e-3)
    loss = jax.jit(hand_loss)(state.net.params, jnp.asarray(new_x), jnp.asarray(new_y),
                              current, jnp.asarray(mem_x), jnp.asarray(mem_y), seen, weights,
                              2.0)
    new, metrics = learner_for(cfg)[1](state, b, hp, key)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=2e-5)
    for got, want in zip(new.stats, stats, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
    np.testing.assert_array_equal(new.current, current)
    if step == 3:  # the pre-update learner had not seen classes 2 and 3
        logits = np.asarray(metrics["stream_logits"])
        assert (logits[:, 2:] == gsa.UNSEEN).all() and (logits[:, :2] > -1e3).all()


def test_memory_batch_takes_current_rows_by_the_share_of_current_classes():
    # task 0: rate 1, no rows of other tasks; the first batch, with an empty memory, trains the
    # incoming rows alone
    cfg = gsa.Config(buffer_size=32, memory_batch=32, current_replay=8, augment="none",
                     flip_copy=False)
    learner, state, bs = run(cfg, 0)
    b = step_of(bs, 0)
    _, metrics = learner_for(cfg)[1](state, b, gsa.HParams(), jax.random.PRNGKey(3))
    classes = jnp.array([True, True, False, False])
    np.testing.assert_allclose(
        metrics["loss"], hand_loss(state.net.params, b.x, b.y, classes, None, None, None,
                                   None, 2.0), rtol=1e-5)
    # task 1 shows class 2 only: rate 1/3, and a memory batch of 5 rows takes int(10/3) = 3
    # rows of task 0 and the first int(5/3) = 1 new row
    labels = LABELS.copy()
    labels[3:] = 2
    cfg = gsa.Config(buffer_size=16, memory_batch=5, current_replay=8, augment="none",
                     flip_copy=False)
    learner, state, bs = run(cfg, 4, labels=labels)
    new, _ = learner_for(cfg)[1](state, step_of(bs, 4), gsa.HParams(), jax.random.PRNGKey(4))
    added = np.asarray(new.stats.count - state.stats.count)
    np.testing.assert_array_equal(added[[2, 3]], [1, 0])
    assert added[:2].sum() == 3


def test_predictions_ignore_classes_not_seen():
    learner, state, bs = run(gsa.Config(buffer_size=32, memory_batch=32, current_replay=8,
                                        augment="none", flip_copy=False), 2)
    logits = np.asarray(learner.predict(state, bs.x[0], None))
    assert (logits[:, 2:] == gsa.UNSEEN).all() and (logits[:, :2] > -1e3).all()


def test_flip_copy_is_dropped_on_permuted_streams_unless_set():
    cfg = gsa.Config()
    permuted = types.SimpleNamespace(kind="permuted")
    fitted, note = gsa.fit_to_stream(cfg, permuted, set())
    assert not fitted.flip_copy and "permuted" in note
    assert gsa.fit_to_stream(cfg, permuted, {"flip_copy"}) == (cfg, None)
    assert gsa.fit_to_stream(cfg, types.SimpleNamespace(kind="split"), set()) == (cfg, None)


def test_rows_left_out_of_the_losses_do_not_reach_batchnorm():
    # what the memory's unfilled slots hold must not matter: rows a loss leaves out are copies
    # of incoming rows, in the batch statistics as in the loss
    net = models.make_model("cnn_bn", C, width=8)
    cfg = gsa.Config(buffer_size=32, memory_batch=24, current_replay=8, augment="none")
    learner, update = learner_for(cfg, net)
    bs = stream()
    hp = gsa.HParams()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    for i in range(4):
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(i))
    junk = jax.random.randint(jax.random.PRNGKey(9), state.buffer.data["x"].shape, 0, 255)
    stored = np.arange(32) < 4 * 4  # written so far, with the pending batch
    x = jnp.where(stored[:, None, None, None], state.buffer.data["x"], junk.astype(jnp.uint8))
    other = state._replace(buffer=state.buffer._replace(data={**state.buffer.data, "x": x}))
    key = jax.random.PRNGKey(5)
    a, ma = update(state, step_of(bs, 4), hp, key)
    b, mb = update(other, step_of(bs, 4), hp, key)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7),
                 a.net.model_state, b.net.model_state)
    assert ma["stream_logits"] is None  # the driver scores predict with running statistics


def test_domain_incremental_streams_get_a_warning():
    note = gsa.stream_note(gsa.Config(), types.SimpleNamespace(kind="permuted"))
    assert "no earlier task" in note
    assert gsa.stream_note(gsa.Config(), types.SimpleNamespace(kind="split")) is None
