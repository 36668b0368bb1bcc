"""Inner products of parameter pytrees, leaf by leaf.

A-GEM treats the gradient over all parameters as one vector. ``jax.flatten_util.ravel_pytree``
gives that vector but materialises it with a ``concatenate`` of every leaf. Inside a
``lax.scan`` on XLA:CPU, that concatenate fuses with the gradients' bias reductions into a loop
fusion which, at A-GEM's 256-row reference batch, took about 90% of each step (47-77 ms against
4 ms leafwise; see ``docs/performance.md``, ninth round). ``vdot`` gives the same inner product
as a sum of per-leaf ones and never builds the flat vector. (For GSS's per-sample gradient
cosines, summing leaf by leaf gained nothing: there the per-sample gradients themselves cost,
and ``gss.dense_gram`` avoids forming them.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ocljax.types import Array, PyTree


def vdot(a: PyTree, b: PyTree) -> Array:
    """``<a, b>`` of two pytrees of the same structure, as if each were raveled into one
    vector: the sum over leaves of ``jnp.vdot``. A float32 scalar for float32 leaves."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"pytrees differ: {len(la)} leaves against {len(lb)}")
    return sum((jnp.vdot(x, y) for x, y in zip(la, lb, strict=True)),
               start=jnp.zeros((), jnp.result_type(*la, *lb)))

