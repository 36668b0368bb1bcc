import numpy as np
import pytest

from ocljax import metrics

# R[i, j]: accuracy on task j after training through task i (hand-computed values below).
R = np.array([[0.9, 0.1, 0.0],
              [0.95, 0.8, 0.2],
              [0.5, 0.7, 0.9]])


def test_final_and_incremental_accuracy():
    assert metrics.final_average_accuracy(R) == pytest.approx(0.7)
    # mean(0.9, (0.95 + 0.8) / 2, 0.7)
    assert metrics.average_incremental_accuracy(R) == pytest.approx((0.9 + 0.875 + 0.7) / 3)


def test_forgetting_references_differ_as_documented():
    # max: (max(0.9, 0.95) - 0.5 + max(0.1, 0.8) - 0.7) / 2
    assert metrics.forgetting(R, reference="max") == pytest.approx((0.45 + 0.1) / 2)
    # first: (0.9 - 0.5 + 0.8 - 0.7) / 2
    assert metrics.forgetting(R, reference="first") == pytest.approx((0.4 + 0.1) / 2)
    with pytest.raises(ValueError):
        metrics.forgetting(R, reference="last")


def test_backward_transfer_variants():
    assert metrics.backward_transfer(R, "final_row") == pytest.approx((-0.4 - 0.1) / 2)
    # pairs (1,0): +0.05, (2,0): -0.4, (2,1): -0.1 over 3 pairs
    assert metrics.backward_transfer(R, "all_pairs") == pytest.approx(-0.45 / 3)


def test_forward_transfer_with_and_without_baseline():
    assert metrics.forward_transfer(R) == pytest.approx((0.1 + 0.2) / 2)
    b = np.array([0.1, 0.05, 0.1])
    assert metrics.forward_transfer(R, b) == pytest.approx((0.05 + 0.1) / 2)


def test_batched_matrices_and_single_task():
    stack = np.stack([R, R[::-1]])
    np.testing.assert_allclose(metrics.final_average_accuracy(stack), [0.7, np.mean(R[0])])
    assert np.isnan(metrics.forgetting(np.array([[0.5]])))
    with pytest.raises(ValueError):
        metrics.final_average_accuracy(np.zeros((2, 3)))


def test_continual_metrics_by_hand():
    acc = np.array([[0.0, 0.0], [0.5, 0.0], [0.9, 0.0], [0.3, 0.6], [0.7, 0.9]])
    eval_task = np.array([-1, 0, 0, 1, 1])
    anytime = metrics.anytime_accuracy(acc, eval_task)
    np.testing.assert_allclose(anytime[1:], [0.5, 0.9, 0.45, 0.8])
    assert metrics.average_anytime_accuracy(acc, eval_task) == pytest.approx(0.6625)
    # task 0's worst accuracy after its training ended: min(0.3, 0.7)
    assert metrics.min_accuracy(acc, eval_task) == pytest.approx(0.3)
    assert metrics.worst_case_accuracy(acc, eval_task) == pytest.approx(0.9 / 2 + 0.5 * 0.3)


def anytime_run(dense: bool):
    """Two tasks of 1,000 steps; every task is at 0.9 except task 0 during the first 100 steps
    of task 1, where it dips to 0.1. Evaluations every 100 steps, and with ``dense`` every 10
    steps over those first 100 (the stability-gap protocol's schedule)."""
    steps = [0] + list(range(100, 1001, 100))
    steps += list(range(1010, 1101, 10)) if dense else [1100]
    steps += list(range(1200, 2001, 100))
    steps = np.array(steps)
    task = np.where(steps == 0, -1, np.where(steps <= 1000, 0, 1))
    acc = np.full((len(steps), 2), 0.9)
    acc[(steps > 1000) & (steps <= 1100), 0] = 0.1
    return acc, task, steps


def test_average_anytime_accuracy_does_not_depend_on_where_evaluations_are_dense():
    # the curve's time average, by hand: (1000 x 0.9 + 100 x 0.5 + 900 x 0.9) / 2000 = 0.88
    for dense in (False, True):
        acc, task, steps = anytime_run(dense)
        assert metrics.average_anytime_accuracy(acc, task, steps) == pytest.approx(0.88)
    # the plain mean of the evaluations leans towards the dense part: (19 x 0.9 + 10 x 0.5) / 29
    acc, task, steps = anytime_run(True)
    assert metrics.average_anytime_accuracy(acc, task) == pytest.approx((17.1 + 5) / 29)
    # evenly spaced evaluations: weighted and plain means agree
    acc, task, steps = anytime_run(False)
    assert metrics.average_anytime_accuracy(acc, task) == pytest.approx(
        metrics.average_anytime_accuracy(acc, task, steps))
    # a task's last, shorter block counts for its steps only
    acc = np.array([[0.0], [0.6], [0.2]])
    assert metrics.average_anytime_accuracy(acc, [-1, 0, 0], [0, 100, 110]) == pytest.approx(
        (100 * 0.6 + 10 * 0.2) / 110)
