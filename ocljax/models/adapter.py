"""Wrap a flax linen module as an ``ocljax.types.Model`` so learners never import flax."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from ocljax.types import Array, Model


def to_float(x: Array) -> Array:
    """Map pool inputs to floats: integer (uint8) images to float32 in [0, 1]; floating inputs
    keep their dtype (bfloat16 under ``ocljax.precision``'s ``bf16``)."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(jnp.float32) / 255.0
    return x


def from_linen(module: nn.Module, num_classes: int, feature_dim: int) -> Model:
    """Adapt ``module`` whose ``__call__(x, train)`` returns ``(logits, features)``.

    Any variable collection other than ``params`` (e.g. ``batch_stats``) becomes the model
    state, updated in training mode and frozen in evaluation mode.
    """

    def init(key, x):
        variables = module.init(key, to_float(x), train=False)
        variables = dict(variables)
        params = variables.pop("params")
        return params, variables

    def apply(params, model_state, x, train):
        variables = {"params": params, **model_state}
        if train and model_state:
            (logits, feats), updates = module.apply(
                variables, to_float(x), train=True, mutable=list(model_state)
            )
            return logits, feats, dict(updates)
        logits, feats = module.apply(variables, to_float(x), train=train)
        return logits, feats, model_state

    return Model(init=init, apply=apply, num_classes=num_classes, feature_dim=feature_dim)
