"""Wrap a flax linen module as an ``ocljax.types.Model`` so learners never import flax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ocljax.types import Array, Model


def to_float(x: Array) -> Array:
    """Map pool inputs to floats: integer (uint8) images to float32 in [0, 1]; floating inputs
    keep their dtype (bfloat16 under ``ocljax.precision``'s ``bf16``)."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(jnp.float32) / 255.0
    return x


INPUT_NORMS = ("unit", "standard")
INITS = ("flax", "torch")


def torch_initialised(model: Model) -> Model:
    """``model`` whose dense and convolution layers start as PyTorch's do: every ``kernel``
    (fan-in = the product of all but its last dimension) and its sibling ``bias`` drawn
    uniformly from ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (``nn.Linear`` / ``nn.Conv2d``'s
    default, Kaiming-uniform with ``a = sqrt(5)``), instead of Flax's LeCun-normal kernels
    (sqrt(3) times the standard deviation) and zero biases. For parity with runs of Avalanche
    and Mammoth, whose published numbers use PyTorch's default. Other parameters (BatchNorm
    scale and bias) are kept; each layer draws from its own key, split in tree order."""

    def init(key, x):
        params, state = model.init(key, x)
        layers = []

        def collect(tree):
            if isinstance(tree, dict):
                if "kernel" in tree:
                    layers.append(tree)
                for value in tree.values():
                    collect(value)

        collect(params)
        keys = iter(jax.random.split(jax.random.fold_in(key, 0x70C4), max(len(layers), 1)))

        def redraw(tree):
            if not isinstance(tree, dict):
                return tree
            out = {name: redraw(value) for name, value in tree.items()}
            if "kernel" in tree:
                kernel = tree["kernel"]
                bound = 1.0 / float(np.sqrt(np.prod(kernel.shape[:-1])))
                k_kernel, k_bias = jax.random.split(next(keys))
                out["kernel"] = jax.random.uniform(k_kernel, kernel.shape, kernel.dtype,
                                                   -bound, bound)
                if "bias" in tree:
                    bias = tree["bias"]
                    out["bias"] = jax.random.uniform(k_bias, bias.shape, bias.dtype, -bound, bound)
            return out

        return redraw(params), state

    return model._replace(init=init)


def channel_stats(x) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images ``x`` [N, H, W, C] on the
    ``to_float`` scale ([0, 1]), over every pixel of every image (MNIST: 0.1307, 0.3081).
    Computed in float64 chunks of at most 2^23 values (64 MiB), so the pool is never copied
    whole."""
    c = x.shape[-1]
    rows = max(1, 2**23 // max(1, int(np.prod(x.shape[1:]))))
    total, total_sq, n = np.zeros(c), np.zeros(c), 0
    for start in range(0, x.shape[0], rows):
        part = np.asarray(x[start:start + rows], np.float64).reshape(-1, c) / 255.0
        total += part.sum(0)
        total_sq += (part * part).sum(0)
        n += part.shape[0]
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
    std = np.where(std > 0, std, 1.0)  # a constant channel is centred, not divided by zero
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def standardized(model: Model, mean, std) -> Model:
    """``model`` that sees ``(to_float(x) - mean) / std`` per channel instead of ``[0, 1]``
    inputs: the torchvision ``Normalize`` convention of Avalanche and Mammoth (see
    ``channel_stats``). Inputs that are already float (an attack's or augmentation's output on
    the ``[0, 1]`` scale) are standardised the same way, so learners keep working on the
    ``[0, 1]`` scale and only the network sees standardised values."""
    mean = tuple(float(v) for v in mean)
    std = tuple(float(v) for v in std)
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ValueError(f"standardized: need one positive std per mean, got {mean}, {std}")

    def scale(x):
        # in float32 whatever the input's dtype (a bfloat16 input is not standardised in
        # bfloat16), then back to that dtype
        x = to_float(x)
        z = (x.astype(jnp.float32) - jnp.asarray(mean)) / jnp.asarray(std)
        return z.astype(x.dtype)

    def init(key, x):
        return model.init(key, scale(x))

    def apply(params, model_state, x, train):
        return model.apply(params, model_state, scale(x), train)

    return model._replace(init=init, apply=apply)


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
