"""scikit-learn's bundled handwritten digits (UCI optical digits, 1,797 8x8 images):
the embedded default dataset, which needs no network."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from ocljax.data.dataset import Dataset, validate
from ocljax.errors import DataError

N_IMAGES = 1797


def bundled_file() -> Path | None:
    """scikit-learn's ``datasets/data/digits.csv.gz``, located without importing scikit-learn
    (whose import alone costs 1-2 s); None when scikit-learn is not installed."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def read_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixel values 0..16 as float [1797, 8, 8], labels int32 [1797]).

    Reads the CSV that ``sklearn.datasets.load_digits`` reads (64 pixel columns, then the
    label), and falls back to ``load_digits`` itself when the file is not where it used to be.
    """
    path = bundled_file()
    if path is None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise DataError("the embedded digits dataset needs scikit-learn: "
                            "pip install scikit-learn") from None
        bunch = load_digits()
        return bunch.images.astype(np.float64), bunch.target.astype(np.int32)
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: unreadable digits file ({err}); reinstall scikit-learn") from None
    if table.shape != (N_IMAGES, 65):
        raise DataError(f"{path}: expected {N_IMAGES} rows of 65 values, got {table.shape}; "
                        "reinstall scikit-learn")
    return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int32)


def load(test_fraction: float = 0.25) -> Dataset:
    """Digits as uint8 [N, 8, 8, 1] images (pixel values 0..16 scaled to 0..255).

    The train/test split is stratified by class and fixed (the same on every machine).
    """
    images, y = read_arrays()
    x = np.round(images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    ds = Dataset("digits", x[~test], y[~test], x[test], y[test], 10, "sklearn.datasets.load_digits")
    return validate(ds)
