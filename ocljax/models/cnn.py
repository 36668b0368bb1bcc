"""A small convolutional network, optionally with BatchNorm (mutable model state)."""

from __future__ import annotations

from flax import linen as nn

from ocljax.models.adapter import from_linen
from ocljax.models.conv import Conv
from ocljax.types import Model


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
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(self.width)(h))
        return nn.Dense(self.num_classes)(h), h


def small_cnn(
    num_classes: int, channels: int = 32, width: int = 128, batch_norm: bool = False
) -> Model:
    """A two-block CNN for [H, W, C] images; ``batch_norm=True`` carries BatchNorm statistics."""
    module = SmallCNNModule(num_classes, channels, width, batch_norm)
    return from_linen(module, num_classes, width)
