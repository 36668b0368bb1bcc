"""Datasets through tensorflow-datasets: downloads where there is internet, or reads a prepared
tfds data dir. ``tfds.load`` needs TensorFlow: ``pip install 'ocljax[tfds]'``."""

from __future__ import annotations

import numpy as np

from ocljax.data.dataset import Dataset, validate
from ocljax.errors import DataError

NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def available() -> str | None:
    """``None`` when tfds can load image datasets here, else the reason it cannot."""
    try:
        import tensorflow  # noqa: F401
        import tensorflow_datasets  # noqa: F401
    except ImportError as err:
        return f"tensorflow-datasets cannot load datasets here ({err.name} is not installed)"
    return None


def load(name: str, data_dir: str | None = None, download: bool = True) -> Dataset:
    """Load ``name``'s train and test splits as numpy arrays with ``tfds.load``."""
    reason = available()
    if reason is not None:
        raise DataError(reason)
    import tensorflow_datasets as tfds

    try:
        train, test = tfds.load(
            name, split=["train", "test"], batch_size=-1, as_supervised=True,
            data_dir=data_dir, download=download,
        )
        (train_x, train_y), (test_x, test_y) = tfds.as_numpy(train), tfds.as_numpy(test)
    except Exception as err:  # tfds raises many types (network, missing files, ...)
        raise DataError(f"tensorflow-datasets could not load {name!r}: {err}") from None
    ds = Dataset(
        name, np.asarray(train_x, np.uint8), np.asarray(train_y, np.int32),
        np.asarray(test_x, np.uint8), np.asarray(test_y, np.int32),
        NUM_CLASSES.get(name, int(np.max(train_y)) + 1), f"tfds:{data_dir or 'default'}",
    )
    return validate(ds)
