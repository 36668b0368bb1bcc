"""A 2-D convolution with three implementations behind the same parameters.

``impl="xla"`` is ``lax.conv_general_dilated`` differentiated by JAX, which is what GPUs and TPUs
run best (cuDNN).

``impl="matmul"`` lowers the convolution to one matrix product over explicit patches: the
``kh * kw`` shifted (and strided) views of the padded input are concatenated along channels and
multiplied by the kernel reshaped to ``[kh * kw * C_in, C_out]``. Its gradients are a matmul
(weights) and a matmul followed by pads and adds (inputs).

``impl="canonical"`` is ``lax.conv_general_dilated`` with a custom VJP whose two gradient
convolutions are written with the forward pass's own NHWC / HWIO dimension numbers (the
kernel flipped and transposed, the input and the output gradient transposed explicitly).
JAX's own gradient convolutions swap batch and feature dimensions; at the top level of a
program XLA:CPU rewrites them into the NHWC / HWIO form its fast convolution routine needs,
but inside a loop body (every training step of a run is one) measured on 2 cores it left them
as they were and ran them on a generic path: a reduced ResNet-18 step took 1.84 s in a
``lax.scan`` against 0.10 s alone. Written canonically they take the fast path everywhere.
Under ``vmap`` with a kernel per batch element (members of a sweep, vmapped) a convolution
would become a grouped one, which XLA:CPU runs slowly, so there each of the three
convolutions falls back to the patch matmul (a batched matmul); with a shared kernel
(per-sample gradients) the mapped axis is folded into the batch instead.

``impl="auto"`` (the default) picks ``canonical`` when compiling for CPU, except for inputs
with fewer than ``MATMUL_BELOW_CHANNELS`` channels (an RGB or grey image), whose patches are
small and which XLA:CPU's convolution handles poorly (4.1 ms against 0.7 ms for the first
layer of the CIFAR models at 20 images), and ``xla`` otherwise.

Parameters are those of ``flax.linen.Conv`` (``kernel`` [kh, kw, C_in, C_out] with LeCun-normal
initialisation, ``bias`` zeros), so every implementation can load the others' weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.custom_batching import custom_vmap

IMPLS = ("auto", "xla", "matmul", "canonical")
MATMUL_BELOW_CHANNELS = 8  # auto on CPU: patch matmul for inputs with fewer channels
DIMS = ("NHWC", "HWIO", "NHWC")


def _pads(padding, size: Sequence[int], kernel: Sequence[int], strides: Sequence[int]):
    """Explicit ``[(lo, hi), (lo, hi)]`` padding for ``padding`` in int | "SAME" | "VALID"."""
    if isinstance(padding, int):
        return [(padding, padding)] * 2
    if padding == "VALID":
        return [(0, 0)] * 2
    if padding == "SAME":
        out = []
        for n, k, s in zip(size, kernel, strides, strict=True):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            out.append((total // 2, total - total // 2))
        return out
    raise ValueError(f"padding must be an int, 'SAME' or 'VALID', got {padding!r}")


def patches(x, kernel: Sequence[int], strides: Sequence[int], pads) -> jax.Array:
    """``[B, H', W', kh * kw * C]``: the receptive field of every output position, ordered
    (row offset, column offset, channel) like a ``[kh, kw, C, F]`` kernel reshaped."""
    (kh, kw), (sh, sw) = kernel, strides
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    views = [x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
             for i in range(kh) for j in range(kw)]
    return views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)


def matmul_conv(x, kernel, strides, pads) -> jax.Array:
    """The convolution as one matmul over ``patches`` (``impl="matmul"``)."""
    return jnp.dot(patches(x, kernel.shape[:2], strides, pads),
                   kernel.reshape(-1, kernel.shape[-1]))


def _input_grad_pads(in_hw, kernel_hw, strides, pads, out_hw):
    """Padding of the input-gradient convolution (a stride-1 convolution of the output gradient
    dilated by the stride with the flipped kernel) that gives back the input's size."""
    out = []
    for n, k, s, (lo, _), o in zip(in_hw, kernel_hw, strides, pads, out_hw, strict=True):
        before = k - lo - 1
        out.append((before, n + k - 1 - ((o - 1) * s + 1) - before))
    return tuple(out)


def _kernel_grad_pads(in_hw, kernel_hw, strides, pads, out_hw):
    """Padding of the kernel-gradient convolution (the input, channels as batch, convolved with
    the output gradient dilated by the stride): the forward padding, trimmed at the far end so
    that exactly ``kernel_hw`` positions come out."""
    out = []
    for n, k, s, (lo, hi), o in zip(in_hw, kernel_hw, strides, pads, out_hw, strict=True):
        span = n + lo + hi - ((o - 1) * s + 1) + 1
        out.append((lo, hi - (span - k)))
    return tuple(out)


def _fold(fn, *args):
    """Apply ``fn`` (unbatched) to arrays that all carry a leading mapped axis, folded into
    their batch axis and unfolded from the result's."""
    m = args[0].shape[0]
    out = fn(*(a.reshape(-1, *a.shape[2:]) for a in args))
    return out.reshape(m, -1, *out.shape[1:])


def _mapped(a, batched: bool, size: int):
    return a if batched else jnp.broadcast_to(a, (size, *a.shape))


@partial(jax.jit, static_argnums=(2, 3))
def _forward(x, kernel, strides, pads):
    """``lax.conv`` forward, vmapped as the patch matmul when the kernel is mapped."""

    @custom_vmap
    def op(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=DIMS)

    @op.def_vmap
    def _(size, batched, x, kernel):
        xb, kb = batched
        if not kb:  # a shared kernel: fold the mapped axis into the batch
            return _fold(lambda x: op(x, kernel), x), True
        return jax.vmap(partial(matmul_conv, strides=strides, pads=pads))(
            _mapped(x, xb, size), kernel), True

    return op(x, kernel)


@partial(jax.jit, static_argnums=(2, 3, 4))
def _input_grad(g, kernel, in_hw, strides, pads):
    """Gradient of the convolution with respect to its input, NHWC / HWIO."""
    kernel_hw = kernel.shape[:2]
    ipads = _input_grad_pads(in_hw, kernel_hw, strides, pads, g.shape[1:3])

    @custom_vmap
    def op(g, kernel):
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # [kh, kw, C_out, C_in]
        return jax.lax.conv_general_dilated(g, flipped, (1, 1), ipads, lhs_dilation=strides,
                                            dimension_numbers=DIMS)

    @op.def_vmap
    def _(size, batched, g, kernel):
        gb, kb = batched
        if not kb:
            return _fold(lambda g: op(g, kernel), g), True

        def one(g, kernel):
            x = jnp.zeros((g.shape[0], *in_hw, kernel.shape[2]), g.dtype)
            return jax.vjp(lambda x: matmul_conv(x, kernel, strides, pads), x)[1](g)[0]

        return jax.vmap(one)(_mapped(g, gb, size), kernel), True

    return op(g, kernel)


@partial(jax.jit, static_argnums=(2, 3, 4))
def _kernel_grad(x, g, kernel_hw, strides, pads):
    """Gradient of the convolution with respect to its kernel, NHWC / HWIO."""
    kpads = _kernel_grad_pads(x.shape[1:3], kernel_hw, strides, pads, g.shape[1:3])

    @custom_vmap
    def op(x, g):
        dk = jax.lax.conv_general_dilated(
            x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), kpads,
            rhs_dilation=strides, dimension_numbers=DIMS)  # [C_in, kh, kw, C_out]
        return dk.transpose(1, 2, 0, 3)

    @op.def_vmap
    def _(size, batched, x, g):
        def one(x, g):
            cols = patches(x, kernel_hw, strides, pads)
            dk = jnp.dot(cols.reshape(-1, cols.shape[-1]).T, g.reshape(-1, g.shape[-1]))
            return dk.reshape(*kernel_hw, x.shape[-1], g.shape[-1])

        xb, gb = batched
        return jax.vmap(one)(_mapped(x, xb, size), _mapped(g, gb, size)), True

    return op(x, g)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x, kernel, strides: tuple, pads: tuple) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO, no dilation) whose gradients are convolutions
    with the same dimension numbers (``impl="canonical"``; see the module docstring).
    ``strides``: ``(sh, sw)``; ``pads``: ``((lo, hi), (lo, hi))``, both tuples."""
    return _forward(x, kernel, strides, pads)


def _canonical_fwd(x, kernel, strides, pads):
    return _forward(x, kernel, strides, pads), (x, kernel)


def _canonical_bwd(strides, pads, res, g):
    x, kernel = res
    return (_input_grad(g, kernel, x.shape[1:3], strides, pads),
            _kernel_grad(x, g, kernel.shape[:2], strides, pads))


canonical_conv.defvjp(_canonical_fwd, _canonical_bwd)


class Conv(nn.Module):
    """``flax.linen.Conv`` (NHWC, no dilation, no groups) with a choice of implementation."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: int | str = "SAME"
    use_bias: bool = True
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, x.shape[-1], self.features))
        kernel = kernel.astype(x.dtype)
        pads = _pads(self.padding, x.shape[1:3], self.kernel_size, self.strides)
        impl = self.impl
        if impl == "auto":
            impl = "xla"
            if jax.default_backend() == "cpu":
                impl = "matmul" if x.shape[-1] < MATMUL_BELOW_CHANNELS else "canonical"
        if impl == "matmul":
            y = matmul_conv(x, kernel, tuple(self.strides), pads)
        elif impl == "canonical":
            y = canonical_conv(x, kernel, tuple(self.strides), tuple(map(tuple, pads)))
        elif impl == "xla":
            y = jax.lax.conv_general_dilated(x, kernel, self.strides, pads,
                                             dimension_numbers=DIMS)
        else:
            raise ValueError(f"unknown convolution impl {impl!r}; choose one of {IMPLS}")
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
        return y


__all__ = ["IMPLS", "Conv", "canonical_conv", "matmul_conv", "patches"]
