import dataclasses

import numpy as np
import pytest

from ocljax import streams
from ocljax.errors import ConfigError
from ocljax.streams import schedule


def test_split_tasks_hold_their_classes_and_use_every_sample(tiny_ds):
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4)
    st = streams.build(cfg, tiny_ds, [0, 1])
    assert st.task_batches == [12, 12]
    y = tiny_ds.train_y[st.orders]  # [M, n_batches, B]
    assert set(np.unique(y[:, :12])) == {0, 1} and set(np.unique(y[:, 12:])) == {2, 3}
    assert len(np.unique(st.orders[0])) == 96  # each training sample exactly once
    assert not np.array_equal(st.orders[0], st.orders[1])  # per-seed sample order


def test_random_class_order_is_per_seed_and_reproducible(tiny_ds):
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, class_order="random")
    a = streams.build(cfg, tiny_ds, list(range(8)))
    b = streams.build(cfg, tiny_ds, [3])
    assert a.task_classes[3] == b.task_classes[0]
    np.testing.assert_array_equal(a.orders[3], b.orders[0])  # independent of the other members
    assert len({str(tc) for tc in a.task_classes}) > 1
    for m, tc in enumerate(a.task_classes):
        assert set(np.unique(tiny_ds.train_y[a.orders[m, :12]])) == set(tc[0])


def test_permuted_stream_permutes_per_task(tiny_ds):
    import jax.numpy as jnp

    cfg = streams.StreamConfig(kind="permuted", n_tasks=3, batch_size=4, samples_per_task=40)
    st = streams.build(cfg, tiny_ds, [0])
    assert st.task_batches == [10, 10, 10] and st.n_views == 3
    perm = st.aux["perm"][0]
    assert all(sorted(p) == list(range(16)) for p in perm)
    assert not np.array_equal(perm[0], perm[1])
    x = tiny_ds.train_x[:2]
    aux = {"perm": jnp.asarray(perm)}
    out = np.asarray(st.transform(aux, jnp.array([1, 2]), jnp.asarray(x)))
    np.testing.assert_array_equal(out[0].reshape(-1), x[0].reshape(-1)[perm[1]])
    np.testing.assert_array_equal(out[1].reshape(-1), x[1].reshape(-1)[perm[2]])
    n = len(tiny_ds.train_y)
    assert (st.orders[0, :10] < n).all() and (st.orders[0, 10:20] // n == 1).all()
    mixed = streams.build(streams.StreamConfig(**{**cfg.__dict__, "iid": True}), tiny_ds, [0])
    assert len(np.unique(mixed.orders[0, :10] // n)) > 1  # tasks interleaved
    assert sorted(mixed.orders[0].ravel()) == sorted(st.orders[0].ravel())


def test_iid_stream_mixes_tasks_with_same_length(tiny_ds):
    split = streams.build(streams.StreamConfig(kind="split", n_tasks=2, batch_size=4), tiny_ds, [0])
    iid = streams.build(streams.StreamConfig(iid=True, n_tasks=2, batch_size=4), tiny_ds, [0])
    assert iid.total_steps == split.total_steps
    first = tiny_ds.train_y[iid.orders[0, :12]]
    assert len(np.unique(first)) == 4  # all classes early on


def test_schedule_blocks_align_task_ends_and_pad():
    sch = schedule.build([5, 3], passes=2, eval_every=4)
    # task 0: 10 steps -> 3 blocks (last padded), task 1: 6 steps -> 2 blocks
    assert sch.n_blocks == 5 and sch.total_steps == 16
    assert list(sch.eval_kind) == [1, 1, 2, 1, 2]
    assert list(sch.end_step) == [4, 8, 10, 14, 16]
    assert sch.steps.valid.sum() == 16
    assert sch.steps.fresh.sum() == 8
    assert list(sch.steps.t[sch.steps.valid]) == list(range(16))
    chunks = list(schedule.chunks(sch, np.zeros((1, 8, 2), np.int32), blocks_per_chunk=2))
    assert len(chunks) == 3 and chunks[-1].eval_kind.tolist() == [2, 0]


@pytest.mark.parametrize("kw", [
    dict(task_batches=[5, 3], passes=2, eval_every=4),
    dict(task_batches=[7, 1, 9], passes=1, eval_every=0),
    dict(task_batches=[30, 11], passes=3, eval_every=20, dense_every=5, dense_window=10),
])
def test_valid_steps_are_a_prefix_of_every_block(kw):
    # the driver runs each block as a loop over its first valid.sum() steps
    sch = schedule.build(**kw)
    chunks = list(schedule.chunks(sch, np.zeros((1, sum(kw["task_batches"]), 2), np.int32),
                                  blocks_per_chunk=3))
    for valid in [sch.steps.valid, *(c.steps.valid for c in chunks)]:
        n = valid.sum(1, keepdims=True)
        assert (valid == (np.arange(valid.shape[1]) < n)).all()


@pytest.mark.parametrize("kw, message", [
    ({"n_tasks": 3}, "cannot be split into 3"),
    ({"batch_size": 100}, "fewer than batch_size"),
    ({"kind": "spiral"}, "unknown stream"),
    ({"blurry": 1.0}, r"blurry must be in \[0, 1\)"),
    ({"blurry": -0.1}, r"blurry must be in \[0, 1\)"),
    ({"kind": "rotated", "max_rotation": 400}, r"max_rotation must be in \[0, 360\]"),
    ({"blurry": 0.1, "n_tasks": 1}, "blurry=0.1 needs at least 2 tasks"),
    ({"blurry": 0.01}, r"blurry=0.01 moves no sample: .* 48 samples .*; use blurry >= 0.021"),
    ({"eval_every": -1}, "eval_every must be >= 0"),
    ({"class_order": "sorted"}, "class_order"),
    ({"eval_every": 10, "eval_dense_every": 4}, "multiple of eval_dense_every"),
    ({"eval_dense_window": 8}, "needs eval_dense_every"),
    ({"near_future": -2}, "near_future must be >= 0"),
    ({"blind_window": -1}, "blind_window must be >= 0"),
])
def test_bad_stream_settings(tiny_ds, kw, message):
    with pytest.raises(ConfigError, match=message):
        streams.build(streams.StreamConfig(**{"n_tasks": 2, **kw}), tiny_ds, [0])


def test_task_end_only_schedule_has_no_continual_evaluations():
    sch = schedule.build([600, 3], passes=1, eval_every=0)
    assert sch.block_len == schedule.TASK_END_BLOCK
    kinds = sch.eval_kind
    assert set(kinds.tolist()) == {schedule.EVAL_NONE, schedule.EVAL_TASK_END}
    assert (kinds == schedule.EVAL_TASK_END).sum() == 2
    assert sch.steps.valid.sum() == 603 and sch.total_steps == 603


def test_dense_evaluation_after_each_boundary():
    # tasks of 20 and 12 steps; every 2 steps during the first 6 of a task, else every 8
    sch = schedule.build([20, 12], passes=1, eval_every=8, dense_every=2, dense_window=6)
    assert sch.block_len == 2
    evaluated = sch.end_step[sch.eval_kind != schedule.EVAL_NONE].tolist()
    assert evaluated == [2, 4, 6, 8, 16, 20, 22, 24, 26, 28, 32]
    assert (sch.eval_kind == schedule.EVAL_TASK_END).sum() == 2
    # same continual evaluations as the plain schedule outside the window
    plain = schedule.build([20, 12], passes=1, eval_every=8)
    assert set(plain.end_step[plain.eval_kind != 0].tolist()) <= set(evaluated)


def test_near_future_names_the_batch_s_ahead_on_fresh_steps_only():
    sch = schedule.build([3, 2], passes=2, eval_every=0, near_future=2)
    valid = sch.steps.valid
    batch, future, fresh = sch.steps.batch[valid], sch.steps.future[valid], sch.steps.fresh[valid]
    assert batch.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert future.tolist() == [2, -1, 3, -1, 4, -1, -1, -1, -1, -1]  # crosses the boundary
    assert (future[~fresh] == -1).all()
    orders = np.arange(5 * 3).reshape(1, 5, 3).astype(np.int32)
    (chunk,) = schedule.chunks(sch, orders, blocks_per_chunk=sch.n_blocks)
    np.testing.assert_array_equal(chunk.future_idx[0, 0, 0], orders[0, 2])
    off = schedule.build([3, 2], passes=2, eval_every=0)
    assert (off.steps.future == -1).all()
    assert next(schedule.chunks(off, orders, 1)).future_idx is None


@pytest.mark.parametrize("shape, mode", [((28, 28), "L"), ((32, 32, 3), "RGB"),
                                         ((9, 12, 3), "RGB"), ((7, 5), "L")])
def test_rotation_matches_pil_pixel_for_pixel(shape, mode):
    """GEM's rotated MNIST was made with PIL's ``Image.rotate`` (nearest neighbour, zero fill):
    the device-side gather map reproduces it exactly, grey and colour, odd and even sizes,
    quarter turns (where samples fall on pixel edges) and random angles."""
    from ocljax.streams.rotated import rotation_source

    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, shape, dtype=np.uint8)
    for angle in [0.0, 45.0, 90.0, 135.0, 180.0, 270.0, -30.0, *rng.uniform(0, 360, 40)]:
        ours = np.append(x.ravel(), 0)[rotation_source(shape, angle)].reshape(shape)
        pil = np.asarray(image.fromarray(x, mode).rotate(angle))
        np.testing.assert_array_equal(ours, pil, err_msg=f"angle {angle}")


def test_rotation_by_quarter_turns_is_exact():
    from ocljax.streams.rotated import rotation_source

    x = np.arange(6 * 6 * 2).reshape(6, 6, 2)
    turn = lambda a: np.append(x.ravel(), -1)[rotation_source(x.shape, a)].reshape(x.shape)  # noqa: E731
    np.testing.assert_array_equal(turn(0), x)
    np.testing.assert_array_equal(turn(90), np.rot90(x))  # counterclockwise
    np.testing.assert_array_equal(turn(180), x[::-1, ::-1])
    assert (turn(45) == -1).any() and not (turn(90) == -1).any()  # corners fall outside: zeros


def test_rotated_stream_draws_growing_angles_per_seed(tiny_ds):
    import jax.numpy as jnp

    from ocljax.streams.rotated import rotation_source

    cfg = streams.StreamConfig(kind="rotated", n_tasks=4, batch_size=4, samples_per_task=40,
                               max_rotation=180)
    st = streams.build(cfg, tiny_ds, [0, 1, 2])
    assert st.task_batches == [10] * 4 and st.n_views == 4
    angles = st.aux["angle"]  # [M, T]: task k's angle in [45 k, 45 (k + 1))
    assert ((angles >= 45 * np.arange(4)) & (angles < 45 * np.arange(1, 5))).all()
    assert not np.allclose(angles[0], angles[1])
    alone = streams.build(cfg, tiny_ds, [1])  # a member's stream ignores the rest of the sweep
    np.testing.assert_array_equal(alone.aux["angle"][0], angles[1])
    np.testing.assert_array_equal(alone.orders[0], st.orders[1])
    x = tiny_ds.train_x[:3]
    aux = {k: jnp.asarray(v[0]) for k, v in st.aux.items()}
    out = np.asarray(st.transform(aux, jnp.array([0, 2, 3]), jnp.asarray(x)))
    for row, task in enumerate([0, 2, 3]):
        want = np.append(x[row].ravel(), 0)[rotation_source(x.shape[1:], angles[0, task])]
        np.testing.assert_array_equal(out[row].ravel(), want)
    n = len(tiny_ds.train_y)
    assert (st.orders[0, 10:20] // n == 1).all()  # task 1 trains under view 1
    evals = np.asarray(st.eval_tasks(aux, 2, jnp.asarray(tiny_ds.test_y)))
    assert (evals == 2).all()  # every test image counts towards the task of its view


def _task_of_sample(st, ds):
    """The (major) task each incoming sample belongs to, [n_batches * B] for member 0."""
    return np.asarray(st.aux["task_of_class"][0])[ds.train_y[st.orders[0].ravel()]]


def test_blurry_tasks_take_that_fraction_from_the_other_tasks(tiny_ds):
    """Blurry-K: each task keeps its length and gives K% of its samples to the other tasks,
    receiving as many; every sample is still used once, and the guests come from all the
    other tasks and arrive throughout the task, not in a block."""
    ds = tiny_ds._replace(train_x=np.repeat(tiny_ds.train_x, 5, 0),
                          train_y=np.repeat(tiny_ds.train_y, 5, 0))  # 120 per class
    base = streams.StreamConfig(kind="split", n_tasks=4, batch_size=4)
    disjoint = streams.build(base, ds, [0])
    blurry = streams.build(dataclasses.replace(base, blurry=0.25), ds, [0])
    assert blurry.task_batches == disjoint.task_batches == [30] * 4
    assert sorted(blurry.orders[0].ravel()) == sorted(disjoint.orders[0].ravel())
    owner = _task_of_sample(blurry, ds).reshape(4, 120)  # [task segment, position]
    assert (_task_of_sample(disjoint, ds).reshape(4, 120) == np.arange(4)[:, None]).all()
    guests = owner != np.arange(4)[:, None]
    assert (guests.sum(1) == 30).all()  # round(0.25 * 120) in every task
    for k in range(4):
        assert set(owner[k][guests[k]]) == set(range(4)) - {k}  # from every other task
        assert guests[k, :60].any() and guests[k, 60:].any()  # spread through the task
    again = streams.build(dataclasses.replace(base, blurry=0.25), ds, [5, 0])
    np.testing.assert_array_equal(again.orders[1], blurry.orders[0])  # per seed only


def test_blurry_boundaries_of_two_unequal_tasks_and_of_permuted_streams(tiny_ds):
    # two tasks, the first larger: it cannot give more than the second gives back, the
    # excess stays home, and every task keeps its length
    ds = tiny_ds._replace(train_x=tiny_ds.train_x[8:], train_y=tiny_ds.train_y[8:])
    ds = ds._replace(train_x=np.concatenate([tiny_ds.train_x[tiny_ds.train_y == 0][:8],
                                             ds.train_x]),
                     train_y=np.concatenate([np.zeros(8, tiny_ds.train_y.dtype), ds.train_y]))
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, blurry=0.5)
    st = streams.build(cfg, ds, [0])
    sizes = np.bincount(np.asarray(st.aux["task_of_class"][0])[ds.train_y], minlength=2)
    assert st.task_batches == [sizes[0] // 4, sizes[1] // 4]
    owner = _task_of_sample(st, ds)
    first = owner[: st.task_batches[0] * 4]
    assert (first == 1).sum() == round(0.5 * sizes[1])  # all the second task gave
    # permuted: a task's segment holds samples under the other tasks' permutations
    n = len(tiny_ds.train_y)
    cfg = streams.StreamConfig(kind="permuted", n_tasks=3, batch_size=4, samples_per_task=40,
                               blurry=0.1)
    views = streams.build(cfg, tiny_ds, [0]).orders[0].reshape(3, 40) // n
    assert ((views != np.arange(3)[:, None]).sum(1) == 4).all()


def test_runs_made_before_blurry_and_rotated_streams_still_resume():
    """The resume fingerprint leaves out stream settings added since, at their defaults, so
    a run checkpointed before they existed matches; set, they are part of it."""
    from ocljax.cli import build_parser, flag_defaults, plan
    from ocljax.run.experiment import plan_fingerprint

    def stream_of(*flags):
        preset = flag_defaults({"seeds": 1, "seed": 0, "learner": "er", "dataset": "synthetic"})
        args = build_parser("t", "", preset).parse_args(list(flags))
        _, variants = plan(args, preset)
        return plan_fingerprint("t", "synthetic", variants, None)["variants"][0]["stream"]

    old = stream_of()
    assert "blurry" not in old and "max_rotation" not in old and old["kind"] == "split"
    assert stream_of("--set", "blurry=0.1") == {**old, "blurry": 0.1}
    assert stream_of("--stream", "rotated", "--set", "max_rotation=90") == {
        **old, "kind": "rotated", "max_rotation": 90.0}


def test_a_plan_saved_with_the_new_stream_fields_at_their_defaults_resumes(tmp_path):
    import json

    from ocljax.run.experiment import Resumable

    plan = {"variants": [{"label": "er", "stream": {"kind": "split", "n_tasks": 5}}]}
    saved = {"variants": [{"label": "er", "stream": {"kind": "split", "n_tasks": 5,
                                                       "blurry": 0.0, "max_rotation": 180.0}}]}
    (tmp_path / "plan.json").write_text(json.dumps(saved))
    Resumable(tmp_path, plan, 60.0, 1)  # accepted
    saved["variants"][0]["stream"]["blurry"] = 0.1
    (tmp_path / "plan.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"differs in: variants\[0\]\.stream\.blurry"):
        Resumable(tmp_path, plan, 60.0, 1)


def test_blurry_leaves_the_iid_upper_bound_alone_and_works_with_random_class_orders(tiny_ds):
    base = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, iid=True)
    plain = streams.build(base, tiny_ds, [0, 1])
    blurred = streams.build(dataclasses.replace(base, blurry=0.25), tiny_ds, [0, 1])
    np.testing.assert_array_equal(plain.orders, blurred.orders)  # NAME@iid unchanged
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, class_order="random",
                               blurry=0.25)
    st = streams.build(cfg, tiny_ds, [0, 1, 2])
    for m in range(3):  # each member's guests come from the classes of its other task
        y = tiny_ds.train_y[st.orders[m]].reshape(2, -1)
        task_of = np.asarray(st.aux["task_of_class"][m])
        assert ((task_of[y] != np.arange(2)[:, None]).sum(1) == 12).all()


def test_rotated_mnist_preset_runs(shared_data, tmp_path):
    """experiments.rotated_mnist's preset on real MNIST, cut to a few small tasks."""
    import json

    from experiments.rotated_mnist import PRESET
    from ocljax.cli import main

    assert PRESET["stream"] == "rotated" and PRESET["n_tasks"] == 20
    out = tmp_path / "run"
    assert main(["--data-dir", str(shared_data), "--n-tasks", "3", "--seeds", "1",
                 "--learner", "er", "--set", "samples_per_task=50", "--set", "test_per_task=50",
                 "--set", "width=16", "--set", "depth=1", "--probe-per-class", "0", "--quiet",
                 "--no-plots", "--out", str(out)], prog="t", preset=PRESET) == 0
    (member,) = json.loads((out / "members.json").read_text())
    assert len(member["task_angles"]) == 3 and member["task_angles"][2] >= 120


def test_a_blur_that_moves_nothing_is_refused():
    from ocljax.streams.stream import blur_tasks

    rng = np.random.default_rng(0)
    per_task = [np.arange(100), np.arange(100, 104)]
    # 0.1 x 4 rounds to 0: the large task gives 10 samples that have nowhere to go
    with pytest.raises(ConfigError, match=r"only task\(s\) 0 give any \(tasks of \[100, 4\]"):
        blur_tasks(per_task, 0.1, rng)
    for size in (48, 272, 1000):  # the smallest blur the error suggests does move samples
        with pytest.raises(ConfigError, match="use blurry >= ") as err:
            blur_tasks([np.arange(size)] * 3, 0.1 / size, rng)
        least = float(str(err.value).rsplit(">= ", 1)[1])
        moved = blur_tasks([np.arange(size) + k * size for k in range(3)], least, rng)
        assert any((m // size != k).any() for k, m in enumerate(moved))
