"""The in-memory form of a labelled image dataset, before it becomes a stream."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ocljax.errors import DataError


class Dataset(NamedTuple):
    """Train and test arrays on the host; uploaded to the device once by the driver."""

    name: str
    train_x: np.ndarray  # [N, H, W, C] uint8
    train_y: np.ndarray  # [N] int32
    test_x: np.ndarray  # [Nt, H, W, C] uint8
    test_y: np.ndarray  # [Nt] int32
    num_classes: int
    source: str = ""  # where it was loaded from, recorded in config.json


def validate(ds: Dataset) -> Dataset:
    """Check shapes, dtypes and label ranges; raise ``DataError`` naming the problem."""
    if ds.num_classes < 1:
        raise DataError(f"{ds.name}: num_classes must be >= 1, got {ds.num_classes}")
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        if x.ndim != 4:
            raise DataError(f"{ds.name} {split} images must be [N, H, W, C], got {x.shape}")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{ds.name} {split}: {x.shape[0]} images but {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise DataError(f"{ds.name} {split} split is empty")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{ds.name} {split} labels must be a 1-D integer array, got {y.dtype} {y.shape}"
            )
        if y.min() < 0 or y.max() >= ds.num_classes:
            raise DataError(
                f"{ds.name} {split} labels must lie in [0, {ds.num_classes}), "
                f"got [{y.min()}, {y.max()}]"
            )
    if ds.train_x.shape[1:] != ds.test_x.shape[1:]:
        raise DataError(
            f"{ds.name}: train images {ds.train_x.shape[1:]} differ from test {ds.test_x.shape[1:]}"
        )
    return ds
