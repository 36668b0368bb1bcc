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
