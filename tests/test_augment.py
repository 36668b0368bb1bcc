"""Augmentations: each transformation checked against a direct numpy construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocljax import augment
from ocljax.errors import ConfigError


def images(b=6, h=8, w=8, c=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(b, h, w, c), dtype=np.uint8)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = images()
    out = np.asarray(augment.random_crop(jax.random.PRNGKey(0), jnp.asarray(x), 2))
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = []
    for i in range(len(x)):
        hits = [(a, b) for a in range(5) for b in range(5)
                if np.array_equal(padded[i, a:a + 8, b:b + 8], out[i])]
        assert hits, f"image {i} is not a window of its padded copy"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # offsets drawn per image
    assert out.dtype == np.uint8


def test_random_flip_mirrors_some_images_and_keeps_the_others():
    x = images(b=32)
    out = np.asarray(augment.random_flip(jax.random.PRNGKey(1), jnp.asarray(x)))
    same = [np.array_equal(o, i) for o, i in zip(out, x, strict=True)]
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x, strict=True)]
    assert all(s or f for s, f in zip(same, flipped, strict=True))
    assert 4 < sum(flipped) < 28


def test_random_resized_crop_full_window_is_identity_and_zoom_is_a_sub_window():
    x = images()
    full = augment.random_resized_crop(jax.random.PRNGKey(2), jnp.asarray(x), (1.0, 1.0),
                                       (1.0, 1.0))
    np.testing.assert_array_equal(np.asarray(full), x)
    # a constant image stays constant under any crop and resize
    const = np.full((3, 8, 8, 1), 77, np.uint8)
    out = augment.random_resized_crop(jax.random.PRNGKey(3), jnp.asarray(const))
    np.testing.assert_array_equal(np.asarray(out), const)
    # a zoomed crop of an image with a bright left half and dark right half keeps both
    # values ordered left to right
    ramp = np.zeros((4, 8, 8, 1), np.float32)
    ramp[:, :, :4] = 1.0
    z = np.asarray(augment.random_resized_crop(jax.random.PRNGKey(4), jnp.asarray(ramp)))
    assert (np.diff(z[..., 0], axis=2) <= 1e-6).all()


def np_rrc_areas(rng, n, h, w, scale, ratio=(3 / 4, 4 / 3), attempts=10):
    """Area fractions of torchvision's ``RandomResizedCrop`` window draws (continuous sizes):
    redraw until the window fits, else the whole image."""
    out = np.ones(n)
    for i in range(n):
        for _ in range(attempts):
            area = h * w * rng.uniform(*scale)
            r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
            if np.sqrt(area * r) <= w and np.sqrt(area / r) <= h:
                out[i] = area / (h * w)
                break
    return out


def test_resized_crop_windows_are_redrawn_until_they_fit_not_clipped():
    """Windows follow torchvision's rule (redraw until the window fits) and are never clipped:
    their area fractions have the distribution of that rule (clipping piles large draws up on
    smaller, squarer windows: about a quarter of the draws at scale 0.5-1), stay in ``scale``,
    and are placed uniformly."""
    n, h, w = 20_000, 28, 28
    top, left, ch, cw = map(np.asarray, jax.jit(
        augment.resized_crop_windows, static_argnums=(1, 2, 3, 4))(
        jax.random.PRNGKey(0), n, h, w, (0.5, 1.0)))
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + ch <= h + 1e-4).all() and (left + cw <= w + 1e-4).all()
    ratio = cw / ch
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    frac = ch * cw / (h * w)
    assert frac.min() >= 0.5 - 1e-4 and frac.max() <= 1.0 + 1e-4
    ref = np_rrc_areas(np.random.default_rng(0), 5_000, h, w, (0.5, 1.0))
    got = np.histogram(frac, bins=5, range=(0.5, 1.0 + 1e-6))[0] / n
    want = np.histogram(ref, bins=5, range=(0.5, 1.0 + 1e-6))[0] / len(ref)
    np.testing.assert_allclose(got, want, atol=0.02)
    np.testing.assert_allclose(np.mean(top / (h - ch + 1e-9)), 0.5, atol=0.02)


def test_jitter_zero_strength_is_identity_and_range_is_kept():
    x = images()
    same = augment.random_brightness_contrast(jax.random.PRNGKey(5), jnp.asarray(x), 0.0)
    np.testing.assert_array_equal(np.asarray(same), x)
    out = np.asarray(augment.random_brightness_contrast(jax.random.PRNGKey(5), jnp.asarray(x)))
    assert out.dtype == np.uint8 and not np.array_equal(out, x)


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_clips_after_each_adjustment_in_a_random_order(channels):
    # saturated pixels: brightness x1.3 then contrast differs from the reverse order once
    # clipping happens between them (torchvision's and kornia's ColorJitter)
    rng = np.random.default_rng(channels)
    x = rng.choice(np.array([0.0, 0.5, 0.9, 1.0], np.float32), size=(64, 6, 6, channels))
    key = jax.random.PRNGKey(3)
    got = np.asarray(augment.random_brightness_contrast(key, jnp.asarray(x), 0.4))
    k1, k2, k3 = jax.random.split(key, 3)
    bright = np.asarray(jax.random.uniform(k1, (64, 1, 1, 1), minval=0.6, maxval=1.4))
    contrast = np.asarray(jax.random.uniform(k2, (64, 1, 1, 1), minval=0.6, maxval=1.4))
    first = np.asarray(jax.random.bernoulli(k3, 0.5, (64, 1, 1, 1)))
    luma = np.array([0.299, 0.587, 0.114])

    def adjust_contrast(f):
        grey = (f * luma).sum(-1, keepdims=True) if channels == 3 else f
        m = grey.mean(axis=(1, 2, 3), keepdims=True)
        return np.clip((f - m) * contrast + m, 0, 1)

    def adjust_brightness(f):
        return np.clip(f * bright, 0, 1)

    want = np.where(first, adjust_contrast(adjust_brightness(x)),
                    adjust_brightness(adjust_contrast(x)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert 10 < first.sum() < 54  # both orders occur
    # the order matters on these images
    assert not np.allclose(adjust_contrast(adjust_brightness(x)),
                           adjust_brightness(adjust_contrast(x)), atol=1e-3)


def test_grayscale_turns_about_p_of_colour_images_to_their_luma():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 255, size=(400, 3, 3, 3), dtype=np.uint8)
    out = np.asarray(augment.augment(jax.random.PRNGKey(8), jnp.asarray(x), "gray25"))
    turned = np.all(out[..., :1] == out, axis=(1, 2, 3))  # random colour images never are
    assert 0.18 < turned.mean() < 0.32
    luma = np.round((x.astype(np.float64) * [0.299, 0.587, 0.114]).sum(-1))
    np.testing.assert_allclose(out[turned][..., 0], luma[turned], atol=1)
    np.testing.assert_array_equal(out[~turned], x[~turned])
    grey = x[..., :1]
    np.testing.assert_array_equal(augment.augment(jax.random.PRNGKey(8), jnp.asarray(grey),
                                                  "gray100"), grey)


def test_augment_spec_vmaps_and_is_deterministic():
    x = jnp.asarray(images(b=4))
    keys = jax.random.split(jax.random.PRNGKey(6), 3)
    fn = jax.jit(jax.vmap(lambda k: augment.augment(k, x, "crop2,flip,rrc50,jitter20")))
    a, b = fn(keys), fn(keys)
    assert a.shape == (3, *x.shape) and a.dtype == x.dtype
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # members draw their own transformations
    np.testing.assert_array_equal(augment.augment(keys[0], x, "none"), x)


@pytest.mark.parametrize("spec", ["crop,blur", "flip3", "rotate10"])
def test_bad_spec_is_refused(spec):
    with pytest.raises(ConfigError, match="unknown augmentation"):
        augment.parse(spec)
