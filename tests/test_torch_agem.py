"""The independent PyTorch A-GEM loop used to cross-check the anchor (benchmarks.torch_agem)."""

import numpy as np
import pytest

from benchmarks import torch_agem


def test_reference_rows_are_balanced_over_stored_tasks():
    regions = [np.arange(0, 5), np.arange(5, 8)]
    rng = np.random.default_rng(0)
    cyc = [torch_agem.reference_indices(rng, regions, 8, s, "cyclic") for s in range(3)]
    # 8 // 2 = 4 rows per task, read in order and cyclically; task 1 has only 3 rows
    np.testing.assert_array_equal(cyc[0], [0, 1, 2, 3, 5, 6, 7])
    np.testing.assert_array_equal(cyc[1], [4, 0, 1, 2, 5, 6, 7])
    draws = np.stack([torch_agem.reference_indices(rng, regions, 8, 0, "random")
                      for _ in range(300)])
    assert draws.shape == (300, 8)  # with replacement: always 4 per task
    assert ((draws[:, :4] < 5).all() and (draws[:, 4:] >= 5).all())
    np.testing.assert_array_equal(np.unique(draws[:, 4:]), [5, 6, 7])
    assert any(len(set(r[:4])) < 4 for r in draws)


def test_the_loop_learns_and_projects():
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)).astype(np.float32) * 3
    y = rng.integers(0, 4, 600)
    x = centers[y] + rng.normal(size=(600, 16)).astype(np.float32)
    r = torch_agem.run_seed(x[:500], y[:500], x[500:], y[500:], seed=0, n_tasks=3,
                            patterns=20, mem_batch=12)
    assert len(r["per_task"]) == 3
    assert r["final_acc"] > 0.5  # 4 well-separated classes under 3 permutations
    assert 0 < r["projected_fraction"] < 1
    assert torch_agem.run_seed(x[:500], y[:500], x[500:], y[500:], seed=0, n_tasks=3,
                               patterns=20, mem_batch=12)["final_acc"] == r["final_acc"]
