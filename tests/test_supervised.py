"""The shared gradient step: fused SGD is the same rule as optax's SGD; ``net_learner``'s
shared evaluation functions."""

import jax
import jax.numpy as jnp
import numpy as np

from ocljax import models
from ocljax.learners.supervised import cross_entropy_step, init_net, net_learner


def _steps(optimizer, n=5):
    model = models.make_model("mlp", 4, width=16, depth=2)
    k = jax.random.PRNGKey(0)
    x = jax.random.uniform(k, (n, 6, 5, 5, 1))
    y = jax.random.randint(jax.random.PRNGKey(1), (n, 6), 0, 4)
    net = init_net(model, optimizer, k, x[0], 0.3)

    @jax.jit
    def run(net):
        def step(net, xy):
            net, loss, _ = cross_entropy_step(model, optimizer, net, xy[0], xy[1], None, 0.3)
            return net, loss

        return jax.lax.scan(step, net, (x, y))

    return run(net)


def test_fused_sgd_matches_optax_sgd():
    (net_a, loss_a), (net_b, loss_b) = _steps("sgd"), _steps("sgd_optax")
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(net_a.params), jax.tree.leaves(net_b.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # and both moved away from the initial parameters
    net0 = init_net(models.make_model("mlp", 4, width=16, depth=2), "sgd", jax.random.PRNGKey(0),
                    jnp.zeros((6, 5, 5, 1)), 0.3)
    moved = [float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(net_a.params), jax.tree.leaves(net0.params), strict=True)]
    assert min(moved) > 1e-4


def test_net_learner_reads_the_network_of_either_state_shape():
    """A bare NetState (finetune) and a state holding one as ``.net`` (ER and the rest) give
    the model's evaluation-mode logits and penultimate features; evaluation prepares nothing."""
    from typing import NamedTuple

    class Holder(NamedTuple):
        net: object
        other: object

    model = models.make_model("mlp", 4, width=16, depth=2)
    x = jax.random.uniform(jax.random.PRNGKey(2), (3, 5, 5, 1))
    net = init_net(model, "sgd", jax.random.PRNGKey(0), x, 0.1)
    logits, feats, _ = model.apply(net.params, net.model_state, x, False)
    learner = net_learner(model, init=None, update=None, hparams=())
    for state in (net, Holder(net, jnp.ones(2))):
        np.testing.assert_array_equal(learner.predict(state, x, ()), logits)
        np.testing.assert_array_equal(learner.features(state, x, ()), feats)
        assert learner.prepare_eval(state, (), None) is state
    assert learner.predict(net, x, ()).shape == (3, 4)
