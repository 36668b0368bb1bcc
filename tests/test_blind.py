"""The input-blind baseline (Hammoud et al. 2023) and near-future accuracy in the driver."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from ocljax import learners, models, streams
from ocljax.errors import ConfigError
from ocljax.learners import blind
from ocljax.run import driver


def reference(labels: np.ndarray, window: int, ahead: int, C: int):
    """Blind hits by brute force: labels [n_batches, B] in stream order -> (online hits,
    near-future hits, near-future rows)."""
    past: list[int] = []
    online = future = rows = 0
    for b, y in enumerate(labels):
        counts = np.bincount(past[-window:], minlength=C) if past else np.zeros(C)
        guess = int(np.argmax(counts))
        online += int((y == guess).sum())
        if ahead and b + ahead < len(labels):
            future += int((labels[b + ahead] == guess).sum())
            rows += len(y)
        past.extend(int(v) for v in y)
    return online, future, rows


def test_observe_keeps_the_last_window_labels():
    st = blind.init_state(4)
    st = blind.observe(st, jnp.array([1, 1, 2]))
    assert int(blind.predict_labels(st, 3, 1)[0]) == 1
    st = blind.observe(st, jnp.array([2, 2, 0]))  # window now [2, 2, 2, 0] (oldest dropped)
    np.testing.assert_array_equal(np.sort(np.asarray(st.labels)), [0, 2, 2, 2])
    st = blind.observe(st, jnp.array([0, 0, 0, 0, 0, 1]))  # longer than the window
    np.testing.assert_array_equal(np.sort(np.asarray(st.labels)), [0, 0, 0, 1])
    kept = blind.observe(st, jnp.array([2, 2, 2, 2]), keep=False)  # repeats are not counted
    np.testing.assert_array_equal(kept.labels, st.labels)
    assert int(blind.predict_labels(blind.init_state(3), 5, 1)[0]) == 0  # empty: class 0
    with pytest.raises(ConfigError):
        blind.init_state(0)


def test_blind_learner_ignores_its_input():
    model = models.make_model("mlp", 4, width=8, depth=1)
    learner = blind.make(model, blind.Config(window=5))
    st = learner.init(None, jnp.zeros((2, 4, 4, 1)), blind.HParams())
    st = blind.observe(st, jnp.array([3, 3, 1]))
    a = learner.predict(st, jnp.zeros((2, 4, 4, 1)), blind.HParams())
    b = learner.predict(st, jnp.ones((2, 4, 4, 1)) * 255, blind.HParams())
    np.testing.assert_array_equal(a, b)
    assert (np.argmax(a, -1) == 3).all()
    assert "blind" in learners.LEARNERS


@pytest.mark.parametrize("passes,ahead", [(1, 3), (2, 1)])
def test_driver_blind_and_near_future_match_brute_force(tiny_ds, passes, ahead):
    window = 6
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, eval_every=0,
                               passes=passes, near_future=ahead, blind_window=window,
                               class_order="random")
    seeds = [0, 1]
    stream = streams.build(cfg, tiny_ds, seeds)
    model = models.make_model("mlp", 4, width=8, depth=1)
    learner = blind.make(model, blind.Config(window=window))
    res = driver.run(learner, stream, tiny_ds, [blind.HParams()] * 2, seeds, n_devices=1)
    n = len(tiny_ds.train_y)
    for m in range(2):
        labels = tiny_ds.train_y[stream.orders[m] % n]
        online, future, rows = reference(labels, window, ahead, 4)
        assert res.blind_online_accuracy[m] == pytest.approx(online / labels.size)
        assert res.blind_near_future_accuracy[m] == pytest.approx(future / rows)
        # the blind *learner* predicts exactly what the driver's tracked baseline does
        assert res.online_accuracy[m] == pytest.approx(res.blind_online_accuracy[m])
        assert res.near_future_accuracy[m] == pytest.approx(res.blind_near_future_accuracy[m])


def test_near_future_off_is_nan_and_changes_nothing_else(tiny_ds):
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, eval_every=4,
                               eval_per_task=8)
    module = learners.get("er")
    learner = module.make(models.make_model("mlp", 4, width=16, depth=1),
                          module.Config(buffer_size=8, replay_batch=3))
    hps = [module.HParams()]
    off = driver.run(learner, streams.build(cfg, tiny_ds, [0]), tiny_ds, hps, [0], n_devices=1)
    on_cfg = dataclasses.replace(cfg, near_future=2)
    on = driver.run(learner, streams.build(on_cfg, tiny_ds, [0]), tiny_ds, hps, [0],
                    n_devices=1)
    assert np.isnan(off.near_future_accuracy).all()
    untracked = driver.run(learner, streams.build(dataclasses.replace(cfg, blind_window=0),
                                                  tiny_ds, [0]), tiny_ds, hps, [0], n_devices=1)
    assert np.isnan(untracked.blind_online_accuracy).all()
    np.testing.assert_array_equal(untracked.acc, off.acc)
    assert 0 <= on.near_future_accuracy[0] <= 1
    np.testing.assert_array_equal(on.acc, off.acc)  # scoring ahead does not touch training
    np.testing.assert_array_equal(on.online_accuracy, off.online_accuracy)
