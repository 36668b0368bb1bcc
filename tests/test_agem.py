"""Behaviour that makes A-GEM that method: the projected step and its episodic memories."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_learner
from test_learner_contract import B, batches, run_loop, run_scan, step_of

from ocljax import learners, models
from ocljax.errors import ConfigError
from ocljax.learners import agem
from ocljax.memory import reservoir
from ocljax.types import Batch

MODEL = models.make_model("mlp", 4, width=16, depth=1)
LR = 0.1


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def hand_grad(params, x, y):
    """Flattened gradient of the mean softmax cross-entropy, written out independently."""

    def loss(p):
        logits = MODEL.apply(p, {}, x, True)[0]
        logp = logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True)
        return -jnp.take_along_axis(logp, y[:, None], axis=1).mean()

    return flat(jax.grad(loss)(params)).astype(np.float64)


def with_memory(state, x, y):
    """``state`` whose reservoir holds exactly the rows ``(x, y)`` and nothing pending."""
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y, jnp.int32)}
    return state._replace(buffer=reservoir.ReservoirState(data, jnp.asarray(len(y), jnp.int32)),
                          pending_valid=jnp.zeros_like(state.pending_valid))


def applied_gradient(mem_labels_shift):
    """Run one reservoir-mode update on a memory of the stream rows with shifted labels; return
    (applied gradient, stream gradient g, memory gradient g_ref), all recomputed by hand."""
    learner = agem.make(MODEL, agem.Config(buffer_size=B, mem_batch=B))
    bs, hp = batches(), agem.HParams(lr=LR)
    batch = step_of(bs, 0)
    state = learner.init(jax.random.PRNGKey(0), batch.x, hp)
    mem_y = (np.asarray(batch.y) + mem_labels_shift) % 4
    state = with_memory(state, batch.x, mem_y)
    new, _ = jax.jit(learner.update)(state, batch, hp, jax.random.PRNGKey(1))
    applied = (flat(state.net.params) - flat(new.net.params)) / LR
    g = hand_grad(state.net.params, batch.x, batch.y)
    g_ref = hand_grad(state.net.params, batch.x, jnp.asarray(mem_y, jnp.int32))
    return applied, g, g_ref


def test_conflicting_gradient_is_projected_onto_the_memory_gradient_plane():
    applied, g, g_ref = applied_gradient(mem_labels_shift=1)
    assert g @ g_ref < 0, "the test needs conflicting gradients"
    expected = g - (g @ g_ref) / (g_ref @ g_ref) * g_ref  # Eq. 11
    np.testing.assert_allclose(applied, expected, rtol=1e-4, atol=1e-5)
    assert applied @ g_ref >= -1e-4 * np.linalg.norm(applied) * np.linalg.norm(g_ref)
    assert not np.allclose(applied, g, atol=1e-4)


def test_agreeing_gradient_is_applied_unchanged():
    applied, g, g_ref = applied_gradient(mem_labels_shift=0)  # memory = the stream rows
    assert g @ g_ref > 0
    np.testing.assert_allclose(applied, g, rtol=1e-4, atol=1e-5)


def test_project_rule_on_a_hand_example():
    g = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.0])}
    g_ref = {"a": jnp.array([-1.0, 1.0]), "b": jnp.array([0.0])}
    # g.g_ref = -1, |g_ref|^2 = 2: g - (-1/2) g_ref = [0.5, 0.5, 1]
    out = agem.project(g, g_ref)
    np.testing.assert_allclose(flat(out), [0.5, 0.5, 1.0])
    np.testing.assert_allclose(flat(agem.project(g, g_ref, jnp.asarray(False))), flat(g))
    np.testing.assert_allclose(flat(agem.project(g, g)), flat(g))


def test_leafwise_projection_equals_the_raveled_baseline_of_the_benchmark():
    from benchmarks.agem_projection import project_raveled

    params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))[0]
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 8))
    g, g_ref = (jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape), params)
                for _ in range(2))
    g_ref = jax.tree.map(lambda a, b: a - 2 * b, g_ref, g)  # make them conflict
    assert flat(g) @ flat(g_ref) < 0
    np.testing.assert_allclose(flat(agem.project(g, g_ref)), flat(project_raveled(g, g_ref)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory", ["reservoir", "per_task"])
def test_empty_memory_gives_a_plain_sgd_step(memory):
    fmod, finetune = tiny_learner("finetune")
    learner = agem.make(MODEL, agem.Config(memory=memory, buffer_size=8, mem_batch=3,
                                           patterns_per_task=4, max_tasks=3))
    bs, key = batches(), jax.random.PRNGKey(1)
    f = finetune.init(key, bs.x[0], fmod.HParams())
    a = learner.init(key, bs.x[0], agem.HParams())
    # reservoir: batch 0 is replayed from step 1 on; per-task: no task is completed yet
    for i in range(1 if memory == "reservoir" else 2):
        b = step_of(bs, i)._replace(boundary=jnp.asarray(False))
        f, fm = jax.jit(finetune.update)(f, b, fmod.HParams(), key)
        a, am = jax.jit(learner.update)(a, b, agem.HParams(), key)
        np.testing.assert_allclose(fm["loss"], am["loss"], rtol=1e-6)
        np.testing.assert_allclose(flat(f.params), flat(a.net.params), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- per-task memory

P, T, STEPS_PER_TASK = 4, 3, 3
PER_TASK = agem.Config(memory="per_task", patterns_per_task=P, max_tasks=T, mem_batch=8)


def id_stream():
    """3 tasks of 3 batches; each image's pixels all equal the sample's id (task = id // 12)."""
    n = T * STEPS_PER_TASK
    ids = np.arange(n * B).reshape(n, B)
    x = np.broadcast_to(ids[:, :, None, None, None], (n, B, 4, 4, 1)).astype(np.uint8)
    step = np.arange(n)
    return Batch(
        x=jnp.asarray(x), y=jnp.asarray(ids % 4, jnp.int32),
        task=jnp.asarray(step // STEPS_PER_TASK, jnp.int32),
        boundary=jnp.asarray((step % STEPS_PER_TASK == 0) & (step > 0)),
        t=jnp.asarray(step, jnp.int32), fresh=jnp.ones((n,), bool),
    )


def ids_of(x):
    return np.asarray(x)[:, 0, 0, 0].astype(int)


@jax.jit
def reference(state, batch, key):
    """The reference batch that ``update(state, batch, key)`` uses: drawn after the pending
    write and the boundary."""
    k_write, k_ref = jax.random.split(key)
    s = agem.flush_task(PER_TASK, state, k_write, batch.fresh)
    return agem.reference_rows(PER_TASK, agem.close_task(PER_TASK, s, batch.boundary), k_ref)


def test_per_task_memory_holds_patterns_of_each_finished_task_only():
    learner = agem.make(MODEL, PER_TASK)
    bs, hp = id_stream(), agem.HParams()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    update = jax.jit(learner.update)
    for i in range(T * STEPS_PER_TASK):
        batch = step_of(bs, i)
        task = i // STEPS_PER_TASK
        # the reference batch this step uses: after the pending write and the boundary
        ref, mask = reference(state, batch, jax.random.PRNGKey(i))
        ref_tasks = ids_of(ref["x"])[np.asarray(mask)] // (STEPS_PER_TASK * B)
        assert (ref_tasks < task).all(), "a reference row of the current or a later task"
        # balanced like Avalanche's loader: min(mem_batch // n, P) rows of each completed task
        np.testing.assert_array_equal(np.bincount(ref_tasks, minlength=T)[:task],
                                      [min(8 // max(task, 1), P)] * task)
        state, _ = update(state, batch, hp, jax.random.PRNGKey(i))
        assert int(state.n_tasks) == task
        if batch.boundary:  # the finished task's region: P distinct rows, all of that task
            region = ids_of(state.buffer.data["x"][(task - 1) * P: task * P])
            assert int(state.task_rows[task - 1]) == P
            assert len(set(region.tolist())) == P
            assert (region // (STEPS_PER_TASK * B) == task - 1).all()
            np.testing.assert_array_equal(np.asarray(state.buffer.data["y"])[
                (task - 1) * P: task * P], region % 4)


def test_per_task_reference_rows_cycle_through_a_task_region():
    cfg = agem.Config(memory="per_task", patterns_per_task=4, max_tasks=3, mem_batch=3)
    rows = jnp.array([4, 0, 0], jnp.int32)
    seen = [np.asarray(agem.task_balanced_indices(cfg, jnp.asarray(1), rows, jnp.asarray(s))[0])
            for s in range(4)]
    # batches of 3 read in order from a region of 4, wrapping: every row read 3 times
    np.testing.assert_array_equal(np.concatenate(seen), [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])


def test_per_task_random_draw_is_uniform_with_replacement_per_task():
    cfg = agem.Config(memory="per_task", patterns_per_task=5, max_tasks=3, mem_batch=8,
                      ref_draw="random")
    rows = jnp.array([5, 3, 0], jnp.int32)  # task 1 stored only 3 rows
    draw = jax.jit(lambda k: agem.task_random_indices(cfg, jnp.asarray(2), rows, k))
    idx = np.stack([np.asarray(draw(jax.random.PRNGKey(i))[0]) for i in range(400)])
    mask = np.asarray(draw(jax.random.PRNGKey(0))[1])
    # 8 // 2 = 4 rows of each completed task, all used; task 0's from [0, 5), task 1's [5, 8)
    assert mask.all()
    assert ((idx[:, :4] >= 0) & (idx[:, :4] < 5)).all()
    assert ((idx[:, 4:] >= 5) & (idx[:, 4:] < 8)).all()
    # uniform over each region (400 x 4 draws; a cyclic reader would give exact counts and a
    # draw without replacement no repeats within a batch)
    counts = np.bincount(idx[:, :4].ravel(), minlength=5)
    assert counts.min() > 0.8 * 320 and counts.max() < 1.2 * 320, counts
    assert any(len(set(row[:4])) < 4 for row in idx), "never a repeat: not with replacement"
    # with one completed task and mem_batch // 1 = 8 > 5 stored rows, all 8 draws are used
    one = agem.task_random_indices(cfg, jnp.asarray(1), rows, jax.random.PRNGKey(1))
    assert np.asarray(one[1]).all() and (np.asarray(one[0]) < 5).all()
    # nothing completed: nothing used
    assert not np.asarray(agem.task_random_indices(cfg, jnp.asarray(0), rows,
                                                   jax.random.PRNGKey(1))[1]).any()


def test_per_task_random_draw_trains_in_a_scan():
    cfg = agem.Config(memory="per_task", patterns_per_task=P, max_tasks=T, mem_batch=8,
                      ref_draw="random")
    learner = agem.make(MODEL, cfg)
    bs, hp, key = batches(), agem.HParams(), jax.random.PRNGKey(2)
    s_loop, l_loop = run_loop(learner, hp, key, bs)
    s_scan, l_scan = run_scan(learner, hp, key, bs)
    np.testing.assert_allclose(l_loop, l_scan, rtol=1e-5, atol=1e-6)
    cyclic_state, _ = run_scan(agem.make(MODEL, PER_TASK), hp, key, bs)
    assert not np.allclose(flat(s_scan.net.params), flat(cyclic_state.net.params))


def test_per_task_mode_scans_and_needs_boundaries():
    learner = agem.make(MODEL, PER_TASK)
    bs, hp, key = batches(), agem.HParams(), jax.random.PRNGKey(2)
    s_loop, l_loop = run_loop(learner, hp, key, bs)
    s_scan, l_scan = run_scan(learner, hp, key, bs)
    np.testing.assert_allclose(l_loop, l_scan, rtol=1e-5, atol=1e-6)
    assert int(s_scan.n_tasks) == 1  # the contract batches have one later boundary (step 3)
    assert agem.requires_boundaries(PER_TASK) and not agem.requires_boundaries(agem.Config())
    with pytest.raises(ConfigError, match="memory=reservoir"):
        learners.check_stream("agem", task_free=True, cfg=PER_TASK)
    learners.check_stream("agem", task_free=True)


def test_impossible_configs_are_refused():
    with pytest.raises(ConfigError):
        agem.make(MODEL, agem.Config(memory="ring"))
    with pytest.raises(ConfigError, match="ref_draw"):
        agem.make(MODEL, agem.Config(memory="per_task", ref_draw="shuffled"))
    with pytest.raises(ConfigError, match="max_tasks"):
        agem.make(MODEL, agem.Config(memory="per_task", mem_batch=4, max_tasks=10))
