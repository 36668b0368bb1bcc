"""Shared fixtures: tiny data, models and learner configs so the suite fits a 2-core CI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ocljax import data, learners, models

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Smallest sensible static settings for any learner config field of this name.
TINY_CONFIG = {
    "buffer_size": 8, "replay_batch": 3, "mem_batch": 3, "candidates": 6,
    "patterns_per_task": 4, "max_tasks": 3, "retrain_epochs": 1, "retrain_batch": 4,
    "replay_max": 3, "proj_dim": 8, "transforms": "rotations",  # OCM's 4 copies, not 16
    "memory_batch": 4, "current_replay": 2,  # GSA's
}


def tiny_learner(name: str, num_classes: int = 4, model: str = "mlp"):
    """Learner ``name`` on a width-16 MLP (or another ``model``, width 8) with tiny buffers."""
    module = learners.get(name)
    fields = {f.name for f in dataclasses.fields(module.Config)}
    cfg = module.Config(**{k: v for k, v in TINY_CONFIG.items() if k in fields})
    net = models.make_model("mlp", num_classes, width=16, depth=1) if model == "mlp" else \
        models.make_model(model, num_classes, width=8)
    return module, module.make(net, cfg)


@pytest.fixture(scope="session")
def tiny_ds():
    """4 classes of 4x4x1 synthetic images, 24 train / 8 test per class."""
    return data.synthetic.load(num_classes=4, train_per_class=24, test_per_class=8,
                               shape=(4, 4, 1))


@pytest.fixture
def shared_data():
    """The offline MNIST / Fashion-MNIST copies; tests using it skip where they are absent."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA
