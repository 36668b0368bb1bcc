"""The reduced ResNet-18 of the continual-learning literature.

Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, Sec. 5
(and their released code), introduced this smaller ResNet-18 for CIFAR-100 with three times
fewer feature maps per layer (``nf = 20`` instead of 64). It has since become the standard
backbone of online continual learning on CIFAR / miniImageNet (Chaudhry et al. 2019, "On Tiny
Episodic Memories in Continual Learning"; the Mammoth library; Mai et al. 2021, "Online
Continual Learning in Image Classification: An Empirical Survey").

Architecture: 3x3 conv (``nf``, stride 1) + BN + ReLU; four stages of two BasicBlocks each
with ``nf, 2nf, 4nf, 8nf`` channels and first-block strides ``1, 2, 2, 2``; a BasicBlock is
conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or 1x1 conv + BN when the shape
changes), then ReLU; all convolutions have no bias; global average pooling (for 32x32 inputs
over the final 4x4 map, the reference's ``avg_pool2d(out, 4)``) gives the ``8 * nf`` features,
followed by a linear classifier.

With ``nf = 20``, 10 classes and 3 input channels it has **1,094,750** trainable parameters
(BatchNorm scales and biases included, running statistics excluded); ``tests/test_models.py``
computes this count and checks it against the PyTorch twin in ``benchmarks/torch_er.py``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from ocljax.errors import ConfigError
from ocljax.models.adapter import from_linen
from ocljax.models.conv import Conv
from ocljax.types import Model


def _bn(train: bool) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection."""

    channels: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = (self.stride, self.stride)
        # Symmetric padding of 1 (PyTorch's padding=1), not "SAME", which pads strided
        # convolutions of even inputs only on the bottom/right.
        h = Conv(self.channels, (3, 3), strides=s, padding=1, use_bias=False)(x)
        h = nn.relu(_bn(train)(h))
        h = Conv(self.channels, (3, 3), padding=1, use_bias=False)(h)
        h = _bn(train)(h)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.channels:
            shortcut = Conv(self.channels, (1, 1), strides=s, padding="VALID",
                               use_bias=False)(x)
            shortcut = _bn(train)(shortcut)
        return nn.relu(h + shortcut)


class ReducedResNet18Module(nn.Module):
    """Reduced ResNet-18 for [B, H, W, C] inputs; returns ``(logits, pooled features)``."""

    num_classes: int
    nf: int = 20

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = Conv(self.nf, (3, 3), padding=1, use_bias=False)(x)
        h = nn.relu(_bn(train)(h))
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            h = BasicBlock(self.nf * mult, stride)(h, train)
            h = BasicBlock(self.nf * mult, 1)(h, train)
        feats = jnp.mean(h, axis=(1, 2))  # global average pool: 4x4 for 32x32 inputs
        return nn.Dense(self.num_classes)(feats), feats


def reduced_resnet18(num_classes: int, nf: int = 20) -> Model:
    """The reduced ResNet-18 (``nf`` base channels, 20 in the literature); BatchNorm
    statistics are the model state; features are the ``8 * nf`` pooled activations."""
    if nf < 1:
        raise ConfigError(f"resnet18 width (nf) must be >= 1, got {nf}")
    return from_linen(ReducedResNet18Module(num_classes, nf), num_classes, 8 * nf)
