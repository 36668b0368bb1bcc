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
    ({"kind": "rotated"}, "unknown stream"),
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
