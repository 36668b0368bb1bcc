"""In-graph data augmentation as pure functions of ``(key, x)``.

Each function takes a batch ``x`` [B, H, W, C] (uint8 or float) and a PRNG key, draws an
independent transformation per image, and returns a batch of the same shape and dtype, so it
runs inside ``lax.scan`` and under ``vmap`` over members. The transformations are the ones the
OCL literature uses for replay and contrastive methods: random crop after zero padding and
horizontal flip (the standard CIFAR pipeline of He et al. 2016, used by SCR, Mai et al. 2021,
and RAR, Kumari et al. 2022), random resized crop (SimCLR, Chen et al. 2020, Sec. 3; SupCon,
Khosla et al. 2020), brightness/contrast jitter, and random grayscale (SimCLR's, which OnPro,
Wei et al. 2023, applies to colour images).

``augment(key, x, spec)`` composes them from a short spec such as ``"crop4,flip"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ocljax.errors import ConfigError
from ocljax.types import Array


def random_crop(key: Array, x: Array, padding: int = 4) -> Array:
    """Zero-pad each image by ``padding`` pixels on every side and crop a random window of the
    original size (one offset per image, uniform over the ``(2p+1)^2`` positions)."""
    if padding <= 0:
        return x
    b, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: Array, x: Array, p: float = 0.5) -> Array:
    """Mirror each image left-right with probability ``p``."""
    flip = jax.random.bernoulli(key, p, (x.shape[0],))
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


RRC_ATTEMPTS = 10  # window draws per image before falling back to the whole image


def resized_crop_windows(key: Array, b: int, h: int, w: int,
                         scale: tuple[float, float] = (0.2, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    """``b`` random crop windows ``(top, left, height, width)`` [b] each, float.

    As torchvision's ``RandomResizedCrop``: area fraction uniform in ``scale``, aspect ratio
    log-uniform in ``ratio``, redrawn (up to ``RRC_ATTEMPTS`` times) until the window fits in
    the image, then placed uniformly; an image none of whose draws fit gets the whole image
    (torchvision's fallback for a square image). Windows are never clipped, so their area
    fractions stay uniform over ``scale``.
    """
    k_area, k_ratio, k_pos = jax.random.split(key, 3)
    n = (b, RRC_ATTEMPTS)
    area = jax.random.uniform(k_area, n, minval=scale[0], maxval=scale[1]) * h * w
    log_r = jax.random.uniform(k_ratio, n, minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
    r = jnp.exp(log_r)
    cw, ch = jnp.sqrt(area * r), jnp.sqrt(area / r)
    fits = (cw <= w) & (ch <= h)
    first = jnp.argmax(fits, axis=1)  # the first draw that fits (0 when none does)
    pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]  # noqa: E731
    any_fit = fits.any(axis=1)
    cw = jnp.where(any_fit, pick(cw), float(w))
    ch = jnp.where(any_fit, pick(ch), float(h))
    u = jax.random.uniform(k_pos, (b, 2))
    return u[:, 0] * (h - ch), u[:, 1] * (w - cw), ch, cw


def random_resized_crop(key: Array, x: Array, scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Array:
    """Crop a random window covering a fraction in ``scale`` of the image area with aspect
    ratio in ``ratio`` (log-uniform; see ``resized_crop_windows``), and resize it back to the
    full size (bilinear). Integer inputs are rounded back to their dtype.
    """
    b, h, w, c = x.shape
    top, left, ch, cw = resized_crop_windows(key, b, h, w, scale, ratio)

    def one(img, top, left, ch, cw):
        img = img.astype(jnp.float32)
        scale_ = jnp.array([h / ch, w / cw])
        translation = -jnp.array([top, left]) * scale_
        out = jax.image.scale_and_translate(img, (h, w, c), (0, 1), scale_, translation,
                                            method="linear", antialias=False)
        return out

    out = jax.vmap(one)(x, top, left, ch, cw)
    return _like(out, x)


def random_brightness_contrast(key: Array, x: Array, strength: float = 0.4) -> Array:
    """Scale the brightness and the contrast of each image by factors drawn uniformly in
    ``[1 - s, 1 + s]``, in an order drawn per image, clipping to the valid range after each,
    as torchvision's and kornia's ``ColorJitter`` do (they shuffle the order of their
    adjustments at every call). Contrast blends each pixel with the mean of the image's grey
    level (the luma of a colour image): ``(x - m) c + m``."""
    k1, k2, k3 = jax.random.split(key, 3)
    b = x.shape[0]
    top = 255.0 if jnp.issubdtype(x.dtype, jnp.integer) else 1.0
    f = x.astype(jnp.float32)
    bright = jax.random.uniform(k1, (b, 1, 1, 1), minval=1 - strength, maxval=1 + strength)
    contrast = jax.random.uniform(k2, (b, 1, 1, 1), minval=1 - strength, maxval=1 + strength)
    brightness_first = jax.random.bernoulli(k3, 0.5, (b, 1, 1, 1))

    def brighten(f):
        return jnp.clip(f * bright, 0.0, top)

    def contrast_of(f):
        grey = (f * jnp.asarray(LUMA)).sum(-1, keepdims=True) if f.shape[-1] == 3 else f
        mean = grey.mean(axis=(1, 2, 3), keepdims=True)
        return jnp.clip((f - mean) * contrast + mean, 0.0, top)

    f = jnp.where(brightness_first, contrast_of(brighten(f)), brighten(contrast_of(f)))
    return _like(f, x)


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, torchvision's and kornia's grayscale


def random_grayscale(key: Array, x: Array, p: float = 0.25) -> Array:
    """Turn each colour image to grey (every channel the luma ``0.299 R + 0.587 G +
    0.114 B``) with probability ``p``; single-channel images are returned as they are."""
    if x.shape[-1] != 3:
        return x
    grey = (x.astype(jnp.float32) * jnp.asarray(LUMA)).sum(-1, keepdims=True)
    turn = jax.random.bernoulli(key, p, (x.shape[0],))
    return jnp.where(turn[:, None, None, None], _like(jnp.broadcast_to(grey, x.shape), x), x)


def _like(f: Array, x: Array) -> Array:
    """``f`` (float) back in ``x``'s dtype (rounded and clipped for integer images)."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        info = jnp.iinfo(x.dtype)
        return jnp.clip(jnp.round(f), info.min, info.max).astype(x.dtype)
    return f.astype(x.dtype)


def parse(spec: str) -> tuple[tuple[str, float], ...]:
    """Validate an augmentation spec: comma-separated ``crop[P]`` (pad P, default 4),
    ``flip``, ``rrc[S]`` (random resized crop, min scale S/100, default 20), ``jitter[S]``
    (brightness/contrast, strength S/100, default 40), ``gray[P]`` (grayscale with
    probability P/100, default 25); ``""`` or ``"none"`` for nothing."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "none":
            continue
        name = part.rstrip("0123456789")
        digits = part[len(name):]
        defaults = {"crop": 4, "flip": 0, "rrc": 20, "jitter": 40, "gray": 25}
        if name not in defaults or (name == "flip" and digits):
            raise ConfigError(
                f"unknown augmentation {part!r} in {spec!r}; use crop[P], flip, rrc[S], "
                "jitter[S], gray[P] separated by commas (e.g. 'crop4,flip')")
        out.append((name, float(digits) if digits else float(defaults[name])))
    return tuple(out)


SPATIAL = ("crop", "flip", "rrc")  # augmentations that move pixels


def moves_pixels(spec: str) -> bool:
    """Whether ``spec`` (see ``parse``) has a crop, flip or random resized crop."""
    return any(name in SPATIAL for name, _ in parse(spec))


def without_spatial(spec: str) -> str:
    """``spec`` without its pixel-moving parts (crop, flip, random resized crop): what remains
    meaningful when the inputs are pixel permutations (``"none"`` if nothing remains)."""
    parts = (p.strip() for p in spec.split(","))
    return ",".join(p for p in parts if p and not moves_pixels(p) and parse(p)) or "none"


def augment(key: Array, x: Array, spec: str) -> Array:
    """Apply the augmentations of ``spec`` (see ``parse``) in order, each with its own key."""
    steps = parse(spec)
    keys = jax.random.split(key, max(len(steps), 1))
    for k, (name, arg) in zip(keys, steps, strict=False):
        if name == "crop":
            x = random_crop(k, x, int(arg))
        elif name == "flip":
            x = random_flip(k, x)
        elif name == "rrc":
            x = random_resized_crop(k, x, (arg / 100.0, 1.0))
        elif name == "gray":
            x = random_grayscale(k, x, arg / 100.0)
        else:
            x = random_brightness_contrast(k, x, arg / 100.0)
    return x
