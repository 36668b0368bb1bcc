"""A small convolutional network, optionally with BatchNorm (mutable model state)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from ocljax.models.adapter import from_linen
from ocljax.models.conv import Conv
from ocljax.types import Model


def max_pool_2x2(h: jax.Array) -> jax.Array:
    """``nn.max_pool(h, (2, 2), strides=(2, 2))`` (VALID: an odd last row or column is dropped),
    written as elementwise maxima and selections of the four strided views of ``h [B, H, W, C]``.

    Values and gradients are bit-identical to ``nn.max_pool``'s, ties included: the gradient goes
    to the first maximal position of each window in row-major order, as XLA's select-and-scatter
    (and PyTorch's max pooling) sends it. Select-and-scatter is slow on XLA:CPU: on 2 cores the
    forward and backward pass of the small CNN's first pooling (20 x 32 x 32 x 32) took 6 ms
    that way and 0.8 ms this way."""
    H, W = h.shape[1] // 2 * 2, h.shape[2] // 2 * 2
    a, b = h[:, 0:H:2, 0:W:2], h[:, 0:H:2, 1:W:2]
    c, d = h[:, 1:H:2, 0:W:2], h[:, 1:H:2, 1:W:2]
    m = jax.lax.stop_gradient(jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d)))
    take_a = a == m
    take_b = ~take_a & (b == m)
    take_c = ~take_a & ~take_b & (c == m)
    # a NaN in a window matches nothing: the window's value is then the (NaN) maximum itself
    return jnp.where(take_a, a, jnp.where(take_b, b, jnp.where(take_c, c,
                                                              jnp.where(d == m, d, m))))


class SmallCNNModule(nn.Module):
    """conv(c)-pool-conv(2c)-pool-dense(width); BatchNorm after each conv when ``batch_norm``."""

    num_classes: int
    channels: int = 32
    width: int = 128
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = x
        for mult in (1, 2):
            h = Conv(self.channels * mult, (3, 3))(h)
            if self.batch_norm:
                h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
            h = nn.relu(h)
            if h.shape[1] >= 4:  # keep tiny inputs (8x8 digits) spatially non-empty
                h = max_pool_2x2(h)
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(self.width)(h))
        return nn.Dense(self.num_classes)(h), h


def small_cnn(
    num_classes: int, channels: int = 32, width: int = 128, batch_norm: bool = False
) -> Model:
    """A two-block CNN for [H, W, C] images; ``batch_norm=True`` carries BatchNorm statistics."""
    module = SmallCNNModule(num_classes, channels, width, batch_norm)
    return from_linen(module, num_classes, width)
