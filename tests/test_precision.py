"""The precision setting: float32 / tf32 / bf16 matmuls, parameters always float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_learner

from ocljax import learners, models, precision, streams
from ocljax.errors import ConfigError
from ocljax.run import driver


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        precision.check("fp8")
    with pytest.raises(ConfigError, match="unknown precision"):
        precision.cast_model(models.make_model("mlp", 3), "half")


def test_float32_and_tf32_leave_the_model_alone():
    model = models.make_model("mlp", 3, width=8, depth=1)
    assert precision.cast_model(model, "float32") is model
    assert precision.cast_model(model, "tf32") is model


def test_bf16_computes_in_bfloat16_and_returns_float32():
    model = models.make_model("mlp", 3, width=32, depth=2)
    low = precision.cast_model(model, "bf16")
    x = jax.random.randint(jax.random.PRNGKey(0), (5, 4, 4, 1), 0, 255).astype(jnp.uint8)
    params, state = model.init(jax.random.PRNGKey(1), x)
    ref, _, _ = model.apply(params, state, x, False)
    out, feats, _ = low.apply(params, state, x, False)
    assert out.dtype == jnp.float32 and feats.dtype == jnp.float32
    assert not np.array_equal(out, ref)  # really rounded through bfloat16 ...
    np.testing.assert_allclose(out, ref, atol=0.05, rtol=0.05)  # ... but close
    # the matmuls in the lowered program take bfloat16 operands
    hlo = jax.jit(lambda p: low.apply(p, state, x, False)[0]).lower(params).as_text()
    assert "bf16" in hlo
    # gradients reach the float32 parameters in float32
    grads = jax.grad(lambda p: low.apply(p, state, x, True)[0].sum())(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("prec", ["tf32", "bf16"])
def test_driver_runs_each_precision_with_float32_state(tiny_ds, prec):
    module, _ = tiny_learner("er")
    model = precision.cast_model(models.make_model("mlp", 4, width=16, depth=1), prec)
    learner = module.make(model, module.Config(buffer_size=8, replay_batch=3))
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, eval_every=4,
                               eval_per_task=8)
    res = driver.run(learner, streams.build(cfg, tiny_ds, [0]), tiny_ds,
                     [learners.er.HParams(0.1)], [0], n_devices=1, precision=prec,
                     keep_state=True)
    params = res.final_state.net.params
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert np.isfinite(res.acc).all() and res.acc[0, -1].mean() > 0.25
