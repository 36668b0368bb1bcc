"""Loss functions written for one batch; masks select the rows that count."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from ocljax.types import Array


def masked_mean(values: Array, mask: Array | None) -> Array:
    """Mean of ``values`` [N] over rows where ``mask`` [N] is True (0 when none are)."""
    if mask is None:
        return values.mean()
    mask = mask.astype(values.dtype)
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def cross_entropy(logits: Array, labels: Array, mask: Array | None = None) -> Array:
    """Softmax cross-entropy, averaged over unmasked rows.

    logits: [N, C] float; labels: [N] int; mask: [N] bool or None.
    """
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return masked_mean(per_row, mask)
