"""The chunked-scan driver: sweep parity, chunking, compile-once, sharding, task-free."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_learner

from ocljax import streams
from ocljax.errors import ConfigError
from ocljax.run import driver
from ocljax.types import Learner, identity_prepare_eval

CFG = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, eval_every=4,
                           eval_per_task=8)


def run(ds, name, seeds, lrs=None, **kw):
    module, learner = tiny_learner(name)
    lrs = lrs or [0.1] * len(seeds)
    stream = streams.build(kw.pop("cfg", CFG), ds, seeds)
    hps = [module.HParams(lr=lr) for lr in lrs]
    return driver.run(learner, stream, ds, hps, seeds, n_devices=1, **kw)


@pytest.mark.parametrize("name", ["finetune", "er"])
def test_member_of_a_sweep_equals_a_single_run(tiny_ds, name):
    sweep = run(tiny_ds, name, [5, 6, 7])
    single = run(tiny_ds, name, [6])
    np.testing.assert_allclose(sweep.acc[1], single.acc[0], atol=1e-6)
    np.testing.assert_allclose(sweep.online_accuracy[1], single.online_accuracy[0], atol=1e-9)
    np.testing.assert_allclose(sweep.block_loss[1], single.block_loss[0], rtol=1e-5)
    # different seeds really differ
    assert not np.allclose(sweep.block_loss[0], sweep.block_loss[1])


def test_results_do_not_depend_on_chunking_and_compile_once(tiny_ds):
    whole = run(tiny_ds, "er", [0, 1])
    small = run(tiny_ds, "er", [0, 1], blocks_per_chunk=1)
    assert small.trace_count == 1  # many chunks, one trace
    n_chunks = len(small.eval_step) - 1
    assert n_chunks > 3
    np.testing.assert_allclose(whole.acc, small.acc, atol=1e-6)
    np.testing.assert_allclose(whole.block_loss, small.block_loss, rtol=1e-5)


def test_grid_over_traced_hparams_is_one_program(tiny_ds):
    res = run(tiny_ds, "finetune", [0, 0, 0], lrs=[0.0, 0.05, 0.5])
    assert res.trace_count == 1
    # lr = 0 never learns: accuracy stays at the initial evaluation's
    np.testing.assert_allclose(res.acc[0, -1], res.acc[0, 0])
    assert not np.allclose(res.acc[1], res.acc[2])


def test_compile_mode_policy():
    fast = driver.fast_options()
    assert fast["xla_backend_optimization_level"] == 0
    short = 0.5 * driver.AUTO_FAST_BELOW_S * driver.AUTO_CPU_FLOPS
    long = 2.0 * driver.AUTO_FAST_BELOW_S * driver.AUTO_CPU_FLOPS
    optimized = {"xla_backend_optimization_level": 2}  # LLVM -O2, not XLA's default -O3
    assert driver.optimized_options() == optimized
    assert driver.compiler_options("auto", "cpu", short) == fast
    assert driver.compiler_options("auto", "cpu", long) == optimized
    assert driver.compiler_options("auto", "cpu", None) == optimized  # unknown work
    assert driver.compiler_options("fast", "cpu", long) == fast
    assert driver.compiler_options("optimized", "cpu", short) == optimized
    assert driver.compiler_options("full", "cpu", short) is None  # XLA's defaults
    assert driver.compile_effort("auto", "cpu", long) == "optimized"
    for backend in ("gpu", "tpu"):
        for mode in driver.COMPILE_MODES:
            assert driver.compiler_options(mode, backend, short) is None
            assert driver.compile_effort(mode, backend, short) == "full"
    with pytest.raises(ConfigError, match="compile mode"):
        driver.compiler_options("quick", "cpu", short)


def test_fast_options_drop_options_xla_does_not_know(monkeypatch):
    monkeypatch.setitem(driver.FAST_OPTIONS, "xla_no_such_option_in_any_release", True)
    fast = driver.fast_options()
    assert "xla_no_such_option_in_any_release" not in fast
    assert fast["xla_backend_optimization_level"] == 0  # the known ones stay
    # and what is left compiles
    jax.jit(lambda x: x * 2).lower(np.float32(1)).compile(fast)
    # an optimised effort whose every option is unknown compiles with XLA's defaults
    monkeypatch.setattr(driver, "OPTIMIZED_OPTIONS", {"xla_no_such_option_in_any_release": 2})
    assert driver.optimized_options() is None
    assert driver.compiler_options("optimized", "cpu", None) is None


def test_fast_and_optimized_compiles_give_the_same_results(tiny_ds, monkeypatch):
    fast_options = driver.fast_options()  # probes XLA's options before the spy is installed
    seen = []  # compiler options of every program the runs compile
    real = jax.stages.Lowered.compile

    def spy(self, compiler_options=None, *a, **kw):
        seen.append(compiler_options)
        return real(self, compiler_options, *a, **kw)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    fast = run(tiny_ds, "er", [0, 1], compile_mode="fast")
    assert len(seen) >= 2 and all(o == fast_options for o in seen)  # chunk, init
    seen.clear()
    opt = run(tiny_ds, "er", [0, 1], compile_mode="optimized")
    assert len(seen) >= 2 and all(o == driver.optimized_options() for o in seen)
    seen.clear()
    full = run(tiny_ds, "er", [0, 1], compile_mode="full")
    assert len(seen) >= 2 and not any(seen)
    # LLVM -O2 and -O3 round an MLP's numbers alike (BatchNorm models: see the module doc)
    np.testing.assert_array_equal(opt.acc, full.acc)
    assert opt.extra["compile"]["effort"] == "optimized"
    assert full.extra["compile"]["effort"] == "full"
    auto = run(tiny_ds, "er", [0, 1], cost=True)
    assert fast.extra["compile"]["fast"] and not opt.extra["compile"]["fast"]
    assert auto.extra["compile"]["fast"]  # a tiny stream: seconds of work at most
    # the estimate is one member's update x steps: no member, device or eval-batch term
    assert auto.extra["compile"]["estimated_work_flops"] == (
        auto.extra["compute"]["flops_per_step"] * auto.total_steps)
    np.testing.assert_allclose(fast.acc, opt.acc, atol=1e-6)
    np.testing.assert_allclose(fast.block_loss, opt.block_loss, rtol=1e-5)
    np.testing.assert_array_equal(fast.acc, auto.acc)
    # a learner that prepares its evaluation (GDumb retrains) has unseen work: optimise
    gdumb = run(tiny_ds, "gdumb", [0], cost=True)
    assert gdumb.extra["compile"]["estimated_work_flops"] is None
    assert not gdumb.extra["compile"]["fast"]


def test_auto_compile_choice_does_not_depend_on_the_sweep_size(tiny_ds, monkeypatch):
    """A member of a sweep compiles as the single run with its seed would, even where the
    sweep's total work is long and one member's is short, so their numbers match bitwise."""
    single = run(tiny_ds, "er", [3], cost=True)
    work = single.extra["compile"]["estimated_work_flops"]
    # the threshold between one member's work and four members'
    monkeypatch.setattr(driver, "AUTO_FAST_BELOW_S", 2 * work / driver.AUTO_CPU_FLOPS)
    single = run(tiny_ds, "er", [3])
    sweep = run(tiny_ds, "er", [0, 1, 2, 3])
    assert single.extra["compile"]["fast"] and sweep.extra["compile"]["fast"]
    np.testing.assert_array_equal(sweep.acc[3], single.acc[0])


def test_accuracy_matrix_and_schedule(tiny_ds):
    res = run(tiny_ds, "finetune", [0])
    R = res.accuracy_matrix()
    assert R.shape == (1, 2, 2)
    assert res.total_steps == 2 * (48 // 4)
    assert res.eval_step[-1] == res.total_steps
    assert np.all(np.diff(res.eval_step) > 0)
    assert 0 <= res.online_accuracy[0] <= 1


class SpyState(NamedTuple):
    steps: jnp.ndarray
    fresh: jnp.ndarray
    task_sum: jnp.ndarray
    boundaries: jnp.ndarray


def spy_learner():
    """Records what the driver shows a learner."""

    def init(key, x, hp):
        z = jnp.zeros((), jnp.int32)
        return SpyState(z, z, z, z)

    def update(state, batch, hp, key):
        new = SpyState(state.steps + 1, state.fresh + batch.fresh, state.task_sum + batch.task,
                       state.boundaries + batch.boundary)
        return new, {"loss": jnp.zeros(()), "stream_logits": jnp.zeros((batch.y.shape[0], 4))}

    def predict(state, x, hp):
        return jnp.zeros((x.shape[0], 4))

    class HP(NamedTuple):
        lr: float = 0.0

    return Learner(init, update, predict, identity_prepare_eval, HP())


@pytest.mark.parametrize("task_free", [False, True])
def test_task_free_hides_boundaries_and_passes_repeat_batches(tiny_ds, task_free):
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, passes=3, eval_every=5,
                               task_free=task_free)
    stream = streams.build(cfg, tiny_ds, [0])
    learner = spy_learner()
    res = driver.run(learner, stream, tiny_ds, [learner.default_hparams], [0], n_devices=1,
                     keep_state=True)
    st = res.final_state
    n_batches = 2 * (48 // 4)
    assert int(st.steps[0]) == 3 * n_batches == res.total_steps  # padding steps never run
    assert int(st.fresh[0]) == n_batches
    if task_free:
        assert int(st.task_sum[0]) == 0 and int(st.boundaries[0]) == 0
    else:
        assert int(st.task_sum[0]) == 3 * (48 // 4)  # task 1's steps
        assert int(st.boundaries[0]) == 1


SHARDED = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from conftest import tiny_learner
from ocljax import data, streams
from ocljax.run import driver
assert len(jax.local_devices()) == 8
ds = data.synthetic.load(num_classes=4, train_per_class=24, test_per_class=8, shape=(4, 4, 1))
cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, eval_every=4)
seeds = list(range(6))  # padded to 8 members on 8 devices
out = {}
for n in (1, 8):
    module, learner = tiny_learner("er")
    res = driver.run(learner, streams.build(cfg, ds, seeds), ds, [module.HParams()] * 6, seeds,
                     n_devices=n)
    out[n] = {"acc": res.acc.tolist(), "loss": res.block_loss.tolist()}
print(json.dumps(out))
"""


def test_sharded_over_8_cpu_devices_equals_unsharded(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", SHARDED, tests_dir], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["8"]["acc"], out["1"]["acc"], atol=1e-6)
    np.testing.assert_allclose(out["8"]["loss"], out["1"]["loss"], rtol=1e-5)


def test_task_end_only_evaluation_gives_the_same_accuracy_matrix(tiny_ds):
    import dataclasses

    every4 = run(tiny_ds, "er", [0, 1])
    ends = run(tiny_ds, "er", [0, 1], cfg=dataclasses.replace(CFG, eval_every=0))
    assert (ends.eval_kind == streams.EVAL_TASK_END).all()
    assert len(ends.eval_step) == CFG.n_tasks + 1 < len(every4.eval_step)
    np.testing.assert_array_equal(ends.accuracy_matrix(), every4.accuracy_matrix())
    np.testing.assert_array_equal(ends.online_accuracy, every4.online_accuracy)


def test_evaluation_batch_does_not_change_results(tiny_ds):
    a = run(tiny_ds, "er", [3])
    b = run(tiny_ds, "er", [3], eval_batch=5)  # pools padded to a multiple of 5 rows
    assert b.extra["eval_batch"] == 5 and a.extra["eval_batch"] == 1000  # 4x4x1 inputs
    np.testing.assert_array_equal(a.acc, b.acc)


def test_default_eval_batch_bounds_rows_per_device():
    assert driver.default_eval_batch(1) == 1000
    assert driver.default_eval_batch(4096) == 128
    assert driver.default_eval_batch(4096) * 4096 <= 2**19
    assert driver.default_eval_batch(1, 28 * 28) == 334  # MNIST
    assert driver.default_eval_batch(1, 32 * 32 * 3) == 85  # CIFAR-shaped


def test_memory_plan_is_reported_and_a_sweep_that_cannot_fit_is_refused(tiny_ds):
    notes = []
    res = run(tiny_ds, "er", [0, 1], log=notes.append)
    plan = res.extra["memory"]
    assert plan["state_per_member"] > 0 and plan["per_member"] >= plan["state_per_member"]
    assert plan["shared"] > 0 and plan["members_per_device"] == 2
    assert any(n.startswith("memory:") and "/member" in n for n in notes)
    limit = plan["shared"] + plan["per_member"]  # room for about one member, not two
    with pytest.raises(driver.ConfigError, match=r"does not fit.*at most 1 member"):
        run(tiny_ds, "er", [0, 1], memory_limit=int(limit / driver.HEADROOM) + 1)
    # a plan object answers how many members fit
    p = driver.MemoryPlan(members_per_device=8, state_per_member=100, shared=1000,
                          program=1000 + 8 * 500, limit=10_000)
    assert p.per_member == 500 and p.fits()
    assert p.max_members_per_device() == int((10_000 * driver.HEADROOM - 1000) // 500)
    assert not driver.MemoryPlan(8, 100, 1000, 1000 + 8 * 500, 4000).fits()



def test_default_evaluation_batch_shrinks_to_fit_memory():
    from ocljax import data

    ds = data.synthetic.load(num_classes=4, train_per_class=24, test_per_class=1000,
                             shape=(8, 8, 1))
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, eval_every=0)
    module, _ = tiny_learner("er")
    from ocljax import models

    learner = module.make(models.make_model("mlp", 4, width=512, depth=2),
                          module.Config(buffer_size=8, replay_batch=3))

    def go(**kw):
        return driver.run(learner, streams.build(cfg, ds, [0]), ds, [module.HParams(0.1)], [0],
                          n_devices=1, **kw)

    big, small = go(eval_batch=1000), go(eval_batch=50)
    need_big, need_small = big.extra["memory"]["program"], small.extra["memory"]["program"]
    assert need_small < need_big
    limit = int((need_small + need_big) / 2 / driver.HEADROOM)  # fits 50, not 1000
    notes = []
    fitted = go(memory_limit=limit, log=notes.append)
    assert fitted.extra["eval_batch"] < 1000
    assert any("retrying" in n for n in notes)
    np.testing.assert_array_equal(fitted.acc, big.acc)
    with pytest.raises(driver.ConfigError, match="does not fit"):
        go(memory_limit=limit, eval_batch=1000)  # an explicit batch is not changed


def test_initial_evaluation_is_the_untrained_model_on_the_full_test_sets(tiny_ds):
    """The initial evaluation runs as the chunk program on blocks that train nothing
    (``schedule.evaluation_chunk``): it equals evaluating each member's initial state directly,
    with the key of the evaluation after step 0."""
    from ocljax.run import evaluation

    module, learner = tiny_learner("er")
    seeds, hp = [3, 4], module.HParams()
    stream = streams.build(CFG, tiny_ds, seeds)
    res = driver.run(learner, stream, tiny_ds, [hp] * 2, seeds, n_devices=1)
    pool = jax.tree.map(jnp.asarray, evaluation.make_pool(
        tiny_ds.test_x[stream.eval_full], tiny_ds.test_y[stream.eval_full], 1000))
    for m, s in enumerate(seeds):
        key = jax.random.PRNGKey(s)
        state = learner.init(jax.random.fold_in(key, 0),
                             jnp.asarray(tiny_ds.train_x[:CFG.batch_size]), hp)
        aux = jax.tree.map(lambda a, m=m: jnp.asarray(a[m]), stream.aux)
        direct = evaluation.per_task_accuracy(
            learner, stream.transform, stream.eval_tasks, stream.n_views, stream.n_tasks, state,
            hp, jax.random.fold_in(jax.random.fold_in(key, 2), 0), aux, pool)
        np.testing.assert_allclose(res.acc[m, 0], direct.acc, atol=1e-6)
        np.testing.assert_allclose(res.task_aware[m, 0], direct.task_aware, atol=1e-6)
    assert not np.allclose(res.acc[0, 0], res.acc[0, -1])  # training moved it afterwards


def test_evaluation_chunk_trains_nothing_and_evaluates_once_at_step_0(tiny_ds):
    stream = streams.build(CFG, tiny_ds, [0, 1])
    layout = next(stream.chunks(3))
    ev = streams.schedule.evaluation_chunk(layout)
    assert jax.tree.map(np.shape, ev) == jax.tree.map(np.shape, layout)
    assert not ev.steps.valid.any() and not ev.steps.fresh.any()
    assert ev.eval_kind.tolist() == [streams.EVAL_TASK_END, 0, 0] and ev.end_step[0] == 0


def test_one_test_pool_when_continual_and_task_end_evaluations_coincide(tiny_ds, monkeypatch):
    import dataclasses

    # all test samples in both kinds of evaluation: one pool, one evaluation branch
    cfg = dataclasses.replace(CFG, eval_per_task=0, test_per_task=0)
    stream = streams.build(cfg, tiny_ds, [0, 1])
    assert driver.shares_eval_pool(stream)
    assert not driver.shares_eval_pool(streams.build(CFG, tiny_ds, [0, 1]))  # 8 of 16 per task
    shared = run(tiny_ds, "er", [0, 1], cfg=cfg)
    # the same run with the two pools kept apart gives the same numbers, bit for bit
    monkeypatch.setattr(driver, "shares_eval_pool", lambda stream: False)
    apart = run(tiny_ds, "er", [0, 1], cfg=cfg)
    assert (shared.eval_kind == streams.EVAL_CONTINUAL).sum() > 2
    for name in ("acc", "task_aware", "cumulative", "online_accuracy", "block_loss"):
        np.testing.assert_array_equal(getattr(shared, name), getattr(apart, name))
    # the memory plan counts the test data once instead of twice
    from ocljax.run import evaluation

    pool = evaluation.make_pool(tiny_ds.test_x, tiny_ds.test_y, shared.extra["eval_batch"])
    saved = apart.extra["memory"]["shared"] - shared.extra["memory"]["shared"]
    assert saved == driver.tree_bytes(pool) > tiny_ds.test_x.nbytes


def test_running_a_compiled_sweep_compiles_nothing(tiny_ds):
    """Everything a run needs is compiled by ``compile_sweep``: ``execute`` dispatches no
    eager device op (each would trace and compile a small program of its own, e.g. summing
    the chunks' hit counts on the device), and its hit counts equal the chunks' sums."""
    from jax import monitoring

    module, learner = tiny_learner("er")
    seeds = [0, 1]
    stream = streams.build(CFG, tiny_ds, seeds)
    hps = [module.HParams(lr=0.1)] * 2
    sweep = driver.compile_sweep(learner, stream, tiny_ds, hps, seeds, n_devices=1,
                                 blocks_per_chunk=1)
    events = []

    def listen(event, duration, **kw):
        events.append(event)

    jax.clear_caches()  # an eager op compiled by an earlier test would not compile again
    monitoring.register_event_duration_secs_listener(listen)
    try:
        res = driver.execute(sweep)
    finally:
        monitoring.unregister_event_duration_listener(listen)
    compiles = [e for e in events if "backend_compile" in e or "jaxpr_trace" in e]
    assert compiles == []
    assert len(res.eval_step) > 3  # several chunks, their counts summed on the host
    whole = driver.run(learner, streams.build(CFG, tiny_ds, seeds), tiny_ds, hps, seeds,
                       n_devices=1)
    np.testing.assert_array_equal(res.online_accuracy, whole.online_accuracy)
    np.testing.assert_array_equal(res.blind_online_accuracy, whole.blind_online_accuracy)


@pytest.mark.parametrize("members", [1, 2])
def test_repeated_batches_score_online_and_near_future_on_fresh_steps_only(tiny_ds, members,
                                                                           monkeypatch):
    """With passes > 1 the evaluation-mode forwards behind online and near-future accuracy
    run on a batch's first pass only (its repeats score nothing; counted with a host callback
    in ``predict``), and the numbers are those of the program that ran them on every step."""
    module, learner = tiny_learner("er")
    calls = []

    def predict(state, x, hp):
        if x.shape[0] == 3:  # the stream's batches, not the evaluations'
            jax.debug.callback(lambda: calls.append(1))
        return learner.predict(state, x, hp)

    def update(state, batch, hp, key):  # no stream logits: the driver calls predict
        new, metrics = learner.update(state, batch, hp, key)
        return new, {k: v for k, v in metrics.items() if k != "stream_logits"}

    counted = learner._replace(predict=predict, update=update)
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=3, passes=3, eval_every=0,
                               near_future=2)
    seeds = list(range(members))
    stream = streams.build(cfg, tiny_ds, seeds)
    hps = [module.HParams()] * members
    got = driver.run(counted, stream, tiny_ds, hps, seeds, n_devices=1)
    jax.effects_barrier()
    batches = stream.orders.shape[1]
    ahead = int((stream.schedule.steps.future >= 0).sum())
    # one online forward per batch, one near-future forward per batch with one 2 ahead; under
    # vmap a callback fires once per step for all members
    assert len(calls) == batches + ahead
    every_step = driver.program_spec
    monkeypatch.setattr(driver, "program_spec",
                        lambda st: dataclasses.replace(every_step(st), repeats=False))
    calls.clear()
    want = driver.run(counted, stream, tiny_ds, hps, seeds, n_devices=1)
    jax.effects_barrier()
    assert len(calls) == 2 * cfg.passes * batches  # the old program: both, on every step
    np.testing.assert_array_equal(got.online_accuracy, want.online_accuracy)
    np.testing.assert_array_equal(got.near_future_accuracy, want.near_future_accuracy)
    np.testing.assert_array_equal(got.acc, want.acc)
