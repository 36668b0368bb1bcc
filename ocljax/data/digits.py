"""scikit-learn's bundled handwritten digits (UCI optical digits, 1,797 8x8 images):
the embedded default dataset, which needs no network."""

from __future__ import annotations

import numpy as np

from ocljax.data.dataset import Dataset, validate


def load(test_fraction: float = 0.25) -> Dataset:
    """Digits as uint8 [N, 8, 8, 1] images (pixel values 0..16 scaled to 0..255).

    The train/test split is stratified by class and fixed (the same on every machine).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = bunch.target.astype(np.int32)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    ds = Dataset("digits", x[~test], y[~test], x[test], y[test], 10, "sklearn.datasets.load_digits")
    return validate(ds)
