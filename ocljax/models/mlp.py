"""Multi-layer perceptron over flattened inputs (the MNIST-family workhorse of OCL papers)."""

from __future__ import annotations

from collections.abc import Sequence

from flax import linen as nn

from ocljax.models.adapter import from_linen
from ocljax.types import Model


class MLPModule(nn.Module):
    """Dense-ReLU stack; features are the last hidden layer."""

    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            h = nn.relu(nn.Dense(width)(h))
        return nn.Dense(self.num_classes)(h), h


def mlp(num_classes: int, hidden: Sequence[int] = (256, 256)) -> Model:
    """An MLP ``D -> hidden... -> num_classes``; inputs of any shape are flattened."""
    hidden = tuple(int(w) for w in hidden)
    return from_linen(MLPModule(hidden, num_classes), num_classes, hidden[-1])
