"""Leafwise inner products equal those of the raveled vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ocljax import tree_math


def _tree(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"dense": {"kernel": jax.random.normal(k1, (7, 5)),
                      "bias": jax.random.normal(k2, (5))},
            "scale": jax.random.normal(k3, (3))}


def test_vdot_is_the_dot_of_the_raveled_vectors():
    a, b = _tree(jax.random.PRNGKey(0)), _tree(jax.random.PRNGKey(1))
    want = ravel_pytree(a)[0] @ ravel_pytree(b)[0]
    np.testing.assert_allclose(tree_math.vdot(a, b), want, rtol=1e-5)
    np.testing.assert_allclose(tree_math.vdot(a, a), jnp.sum(ravel_pytree(a)[0] ** 2), rtol=1e-5)


def test_mismatched_trees_are_refused():
    a = _tree(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="pytrees differ"):
        tree_math.vdot(a, {"scale": a["scale"]})
