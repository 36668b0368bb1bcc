"""Numerical precision of a run's matrix multiplications, as one explicit setting.

=========  =================================================================================
name       what changes
=========  =================================================================================
float32    every matmul and convolution in full float32 (``jax.default_matmul_precision
           ("highest")``). The default: results match a float32 PyTorch loop and are
           bitwise reproducible on the same backend.
tf32       float32 storage, TensorFloat-32 matmul inputs (10-bit mantissa) on GPUs that have
           them (``"tensorfloat32"``); identical to float32 on CPU.
bf16       mixed precision: the model computes in bfloat16 (parameters and inputs are cast on
           the way in, logits and features cast back to float32 on the way out); parameters,
           optimizer state and losses stay float32.
=========  =================================================================================

Parameters are float32 in every mode, so the learning rule itself is unchanged; only the
matmul arithmetic differs. How much accuracy each mode costs is measured by
``benchmarks.suite`` (see docs/performance.md).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from ocljax.errors import ConfigError, unknown_choice
from ocljax.types import Model

PRECISIONS = ("float32", "tf32", "bf16")
_MATMUL = {"float32": "highest", "tf32": "tensorfloat32", "bf16": "default"}


def check(name: str) -> str:
    """Return ``name`` if it is a known precision, else raise ``ConfigError``."""
    if name not in PRECISIONS:
        raise ConfigError(unknown_choice("precision", name, PRECISIONS))
    return name


def matmul_precision(name: str) -> contextlib.AbstractContextManager:
    """Context under which a run is traced and compiled for precision ``name``."""
    return jax.default_matmul_precision(_MATMUL[check(name)])


def cast_model(model: Model, name: str) -> Model:
    """``model`` computing in the precision's dtype (only ``bf16`` changes anything)."""
    if check(name) != "bf16":
        return model
    from ocljax.models.adapter import to_float  # flax is loaded once a model exists

    low = jnp.bfloat16

    def cast(tree):
        return jax.tree.map(
            lambda a: a.astype(low) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
        )

    def apply(params, model_state, x, train):
        x = to_float(x).astype(low)  # uint8 images are scaled in float32 first
        logits, feats, new_state = model.apply(cast(params), model_state, x, train)
        return logits.astype(jnp.float32), feats.astype(jnp.float32), new_state

    return model._replace(apply=apply)


__all__ = ["PRECISIONS", "cast_model", "check", "matmul_precision"]
