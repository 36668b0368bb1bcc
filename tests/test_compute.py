"""Compute accounting: XLA's FLOP count of an update, steps and FLOPs per stream sample."""

import dataclasses
import types

import jax.numpy as jnp
import pytest
from conftest import tiny_learner

from ocljax import learners, models, streams
from ocljax.run import driver

CFG = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, eval_every=0, passes=3)


def test_update_flops_track_the_matmuls():
    x = jnp.zeros((8, 16, 16, 1), jnp.uint8)
    module = learners.get("finetune")
    flops = {}
    for width in (32, 128):
        learner = module.make(models.make_model("mlp", 4, width=width, depth=1), module.Config())
        flops[width] = driver.update_flops(learner, x, module.HParams())
    # 2 FLOPs per weight per sample forward, 2 for the weight gradient, 2 more for the input
    # gradient of every layer but the first (the data needs none)
    for width, f in flops.items():
        matmul = 8 * (4 * 256 * width + 6 * width * 4)
        assert matmul <= f <= 1.5 * matmul, (width, f, matmul)
    assert flops[128] > 3.5 * flops[32]


def test_costs_per_sample_and_replay_costs_more(tiny_ds):
    out = {}
    for name in ("finetune", "er"):
        module, learner = tiny_learner(name)
        stream = streams.build(CFG, tiny_ds, [0, 1])
        res = driver.run(learner, stream, tiny_ds, [module.HParams()] * 2, [0, 1], n_devices=1,
                         cost=True)
        out[name] = res.extra["compute"]
    c = out["finetune"]
    assert c["steps_per_sample"] == pytest.approx(3 / 4)  # passes / batch_size
    assert c["flops_per_sample"] == pytest.approx(c["flops_per_step"] * 3 / 4)
    assert c["wall_s_per_member"] > 0 and c["memory_per_member_bytes"] > 0
    assert out["er"]["flops_per_step"] > 1.5 * c["flops_per_step"]  # 3 replayed + 4 incoming
    no_passes = dataclasses.replace(CFG, passes=1)
    module, learner = tiny_learner("finetune")
    res = driver.run(learner, streams.build(no_passes, tiny_ds, [0]), tiny_ds, [module.HParams()],
                     [0], n_devices=1, cost=True)
    assert res.extra["compute"]["flops_per_step"] == c["flops_per_step"]
    assert res.extra["compute"]["steps_per_sample"] == pytest.approx(1 / 4)


@pytest.mark.parametrize("kind", streams.KINDS)
def test_costs_on_every_stream_kind(tiny_ds, kind):
    """The example batch goes through the stream's own transform (a permuted stream indexes
    its per-task permutations with the view ids: host arrays indexed by tracers failed)."""
    module, learner = tiny_learner("finetune")
    cfg = dataclasses.replace(CFG, kind=kind, passes=1)
    stream = streams.build(cfg, tiny_ds, [0, 1])
    finished = types.SimpleNamespace(run_s=1.0, n_members=2, extra={"memory": {"per_member": 1}})
    flops = driver.member_step_flops(learner, stream, tiny_ds, module.HParams())
    c = driver.compute_costs(stream, flops, finished)
    assert c["flops_per_step"] == flops > 0
