"""Synthetic, class-separable image data of any shape, for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from ocljax.data.dataset import Dataset, validate


def load(
    num_classes: int = 10,
    train_per_class: int = 60,
    test_per_class: int = 20,
    shape: tuple[int, int, int] = (8, 8, 1),
    seed: int = 0,
    noise: float = 40.0,
) -> Dataset:
    """Each class is a fixed random uint8 prototype image plus Gaussian pixel noise."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, size=(num_classes, *shape))

    def draw(per_class):
        y = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
        x = protos[y] + rng.normal(0, noise, size=(len(y), *shape))
        order = rng.permutation(len(y))
        return np.clip(x, 0, 255).astype(np.uint8)[order], y[order]

    train_x, train_y = draw(train_per_class)
    test_x, test_y = draw(test_per_class)
    return validate(
        Dataset("synthetic", train_x, train_y, test_x, test_y, num_classes, f"synthetic:{seed}")
    )
