"""Class-IL, task-aware and cumulative accuracy against values computed by hand."""

import jax.numpy as jnp
import numpy as np

from ocljax.run import evaluation
from ocljax.run.evaluation import batch_counts, make_pool, per_task_accuracy, task_argmax
from ocljax.types import Learner, identity_prepare_eval

# 3 tasks: classes {0,1} -> task 0, {2,3} -> task 1, {4} -> task 2, class 5 unused.
CLASS_TASK = jnp.array([0, 0, 1, 1, 2, -1])
LOGITS = jnp.array([
    # y=0 (task 0): global argmax 2 (wrong); within task 0 -> 1 (wrong); within 0..0 -> 1
    [0.0, 1.0, 5.0, 0.0, 0.0, 0.0],
    # y=1 (task 0): global argmax 5 (unused class, wrong); task 0 -> 1 (right); 0..0 -> 1
    [0.0, 2.0, 1.0, 0.0, 0.0, 9.0],
    # y=3 (task 1): global argmax 4 (wrong); task 1 -> 3 (right); 0..1 -> 3; 0..2 -> 4
    [0.0, 0.0, 0.0, 3.0, 4.0, 0.0],
    # y=4 (task 2): global 4 (right); task 2 -> 4 (right); 0..2 -> 4
    [1.0, 0.0, 0.0, 0.0, 2.0, 0.0],
    # y=2 (task 1), tie between classes 2 and 3: lowest id wins -> 2 (right everywhere)
    [0.0, 0.0, 7.0, 7.0, 0.0, 0.0],
])
Y = jnp.array([0, 1, 3, 4, 2])
SAMPLE_TASK = CLASS_TASK[Y]


def test_task_argmax_per_task_and_empty_task():
    value, cls = task_argmax(LOGITS, CLASS_TASK, 4)  # task 3 has no class
    np.testing.assert_array_equal(cls[:, :3], [[1, 2, 4], [1, 2, 4], [0, 3, 4], [0, 2, 4],
                                               [0, 2, 4]])
    assert (cls[:, 3] == 6).all() and np.isneginf(np.asarray(value[:, 3])).all()
    np.testing.assert_allclose(value[2, :3], [0.0, 3.0, 4.0])


def test_batch_counts_by_hand():
    acc, aware, cum, count, cum_count = batch_counts(LOGITS, Y, SAMPLE_TASK, CLASS_TASK, 3)
    np.testing.assert_array_equal(count, [2, 2, 1])
    np.testing.assert_array_equal(acc, [0, 1, 1])  # rows 4 (task 1) and 3 (task 2) right
    np.testing.assert_array_equal(aware, [1, 2, 1])  # row 0 wrong in its own task
    # k=0: rows 0,1 -> one right; k=1: rows 0,1,2,4 -> rows 1,2,4 right;
    # k=2: all rows, argmax over classes 0..4 -> rows 3,4 right (row 1 -> 1? no: 2 > 1? see)
    np.testing.assert_array_equal(cum_count, [2, 4, 5])
    # k=2, row 1: logits over classes 0..4 = [0,2,1,0,0] -> class 1, right.
    np.testing.assert_array_equal(cum, [1, 3, 3])


def test_padding_rows_and_unused_class_rows_count_nowhere():
    task = SAMPLE_TASK.at[0].set(-1)
    acc, aware, cum, count, cum_count = batch_counts(LOGITS, Y, task, CLASS_TASK, 3)
    np.testing.assert_array_equal(count, [1, 2, 1])
    np.testing.assert_array_equal(cum_count, [1, 3, 4])
    np.testing.assert_array_equal(aware, [1, 2, 1])


def test_single_task_all_three_agree_with_plain_accuracy():
    logits = jnp.array([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]])
    y, ct = jnp.array([0, 0, 1]), jnp.array([0, 0])
    acc, aware, cum, count, cum_count = batch_counts(logits, y, ct[y], ct, 1)
    assert float(acc[0]) == float(aware[0]) == float(cum[0]) == 1.0
    assert float(count[0]) == float(cum_count[0]) == 3.0


def test_per_task_accuracy_over_a_padded_pool_with_unequal_tasks():
    # a "learner" whose logits are the input itself; 7 samples in batches of 3 (2 padded)
    x = np.asarray(jnp.concatenate([LOGITS, jnp.eye(6)[jnp.array([0, 2])] * 3.0]), np.float32)
    y = np.concatenate([np.asarray(Y), [0, 3]])  # last row wrong (predicts 2, task 1)
    learner = Learner(None, None, lambda st, xb, hp: xb, identity_prepare_eval, None)
    out = per_task_accuracy(learner, lambda aux, v, xb: xb,
                            lambda aux, v, yb: CLASS_TASK[yb], 1, 3, None, None, None, None,
                            make_pool(x, y, 3))
    np.testing.assert_allclose(out.acc, [1 / 3, 1 / 3, 1.0])
    np.testing.assert_allclose(out.task_aware, [2 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(out.cumulative, [2 / 3, 4 / 6, 4 / 7], rtol=1e-6)
    z = evaluation.zeros(3)
    assert all(a.shape == (3,) for a in z)
