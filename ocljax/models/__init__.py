"""Models as pure ``(init, apply)`` pairs; see ``ocljax.types.Model``."""

from __future__ import annotations

from ocljax.errors import ConfigError, unknown_choice
from ocljax.models.adapter import (
    INITS,
    INPUT_NORMS,
    channel_stats,
    from_linen,
    standardized,
    to_float,
    torch_initialised,
)
from ocljax.models.cnn import small_cnn
from ocljax.models.mlp import mlp
from ocljax.models.resnet import reduced_resnet18
from ocljax.types import Model

MODELS = ("mlp", "cnn", "cnn_bn", "resnet18")


def make_model(
    name: str, num_classes: int, width: int | None = None, depth: int | None = None
) -> Model:
    """Build a registered model by name; ``None`` means the model's own default.

    ``mlp``: ``depth`` (2) hidden layers of ``width`` (256). ``cnn`` / ``cnn_bn``: the small CNN
    without / with BatchNorm, dense layer of ``width`` (256); ``depth`` is unused.
    ``resnet18``: the reduced ResNet-18 of the continual-learning literature with ``width`` base
    channels (``nf``, 20); its depth is fixed, so ``depth`` must be ``None``.
    """
    if name == "resnet18":
        if depth is not None:
            raise ConfigError(
                f"resnet18 has a fixed depth (stages [2, 2, 2, 2]); got depth={depth}: leave "
                "depth unset (width sets its base channel count nf, 20 by default)"
            )
        return reduced_resnet18(num_classes, nf=20 if width is None else width)
    width = 256 if width is None else width
    depth = 2 if depth is None else depth
    if name == "mlp":
        return mlp(num_classes, (width,) * depth)
    if name == "cnn":
        return small_cnn(num_classes, width=width)
    if name == "cnn_bn":
        return small_cnn(num_classes, width=width, batch_norm=True)
    raise ConfigError(unknown_choice("model", name, MODELS))


__all__ = ["INITS", "INPUT_NORMS", "MODELS", "channel_stats", "from_linen", "make_model", "mlp",
           "reduced_resnet18", "small_cnn", "standardized", "to_float", "torch_initialised"]
