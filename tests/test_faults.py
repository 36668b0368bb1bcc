"""Fault isolation: a diverged member is recorded, frozen and excluded; the others are exact."""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from conftest import tiny_learner

from ocljax import streams
from ocljax.run import driver, results
from ocljax.types import Learner, identity_prepare_eval

CFG = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, eval_every=4,
                           eval_per_task=8)


def sweep(ds, lrs, seeds, name="er"):
    module, learner = tiny_learner(name)
    stream = streams.build(CFG, ds, seeds)
    hps = [module.HParams(lr=lr) for lr in lrs]
    return driver.run(learner, stream, ds, hps, seeds, n_devices=1)


def test_absurd_learning_rate_diverges_alone(tiny_ds):
    mixed = sweep(tiny_ds, [0.1, 1e30, 0.2], [0, 1, 2])
    clean = sweep(tiny_ds, [0.1, 0.2], [0, 2])
    assert mixed.diverged_step.tolist()[0] == -1 and mixed.diverged_step[2] == -1
    assert mixed.diverged_step[1] >= 0 and mixed.diverged_cause[1] == 1
    # the healthy members' numbers are exactly those of a sweep without the bad one
    np.testing.assert_array_equal(mixed.acc[[0, 2]], clean.acc)
    np.testing.assert_array_equal(mixed.online_accuracy[[0, 2]], clean.online_accuracy)
    # frozen: its model never changes after divergence (all evaluations of it are equal
    # from the block it diverged in onwards; here it diverges in the first block)
    assert (mixed.acc[1] == mixed.acc[1, 0]).all()
    rows = results.member_metrics(mixed)
    assert [r["diverged"] for r in rows] == [False, True, False]
    assert rows[1]["diverged_cause"] == "non-finite loss"
    assert rows[1]["diverged_step"] == int(mixed.diverged_step[1])
    members = [{"variant": "er", "hparams": {"lr": lr}, **r}
               for lr, r in zip([0.1, 0.1, 0.1], rows, strict=True)]  # one group of three
    (group,) = results.group_summary(members)
    assert group["n"] == 2 and group["n_diverged"] == 1
    expected = np.mean([rows[0]["final_average_accuracy"], rows[2]["final_average_accuracy"]])
    assert group["final_average_accuracy"]["mean"] == expected


class Net(NamedTuple):
    w: jnp.ndarray


def test_non_finite_state_with_finite_loss_is_caught_at_the_block_end(tiny_ds):
    """A learner whose state turns infinite at step 5 while its reported loss stays finite."""

    def init(key, x, hp):
        return Net(jnp.zeros((4,)))

    def update(state, batch, hp, key):
        w = jnp.where(batch.t == 5, jnp.inf * hp, state.w + 1.0)
        return Net(w), {"loss": jnp.float32(0.5)}

    def predict(state, x, hp):
        return jnp.broadcast_to(jnp.nan_to_num(state.w), (x.shape[0], 4))

    learner = Learner(init, update, predict, identity_prepare_eval, None)
    stream = streams.build(CFG, tiny_ds, [0, 1])
    res = driver.run(learner, stream, tiny_ds, [jnp.float32(1.0), jnp.float32(-1.0)], [0, 1],
                     n_devices=1, keep_state=True)
    # both go infinite at step 5 (block 2 ends at step 8); the state is the block start's
    assert res.diverged_cause.tolist() == [2, 2]
    assert res.diverged_step.tolist() == [8, 8]
    np.testing.assert_array_equal(res.final_state.w, np.full((2, 4), 4.0))
