"""Models as pure ``(init, apply)`` pairs; see ``ocljax.types.Model``."""

from __future__ import annotations

from ocljax.errors import ConfigError
from ocljax.models.adapter import from_linen, to_float
from ocljax.models.cnn import small_cnn
from ocljax.models.mlp import mlp
from ocljax.types import Model

MODELS = ("mlp", "cnn", "cnn_bn")


def make_model(name: str, num_classes: int, width: int = 256, depth: int = 2) -> Model:
    """Build a registered model by name: ``mlp`` (``depth`` hidden layers of ``width``),
    ``cnn`` or ``cnn_bn`` (the small CNN without / with BatchNorm, dense layer of ``width``)."""
    if name == "mlp":
        return mlp(num_classes, (width,) * depth)
    if name == "cnn":
        return small_cnn(num_classes, width=width)
    if name == "cnn_bn":
        return small_cnn(num_classes, width=width, batch_norm=True)
    raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


__all__ = ["MODELS", "from_linen", "make_model", "mlp", "small_cnn", "to_float"]
