"""Fidelity on real MNIST (slow: ``pytest -m slow``; skips without ../shared/data)."""

import json

import pytest

from experiments.split_mnist import PRESET
from ocljax.cli import main


@pytest.mark.slow
def test_er_reaches_090_on_online_split_mnist_and_finetune_collapses(shared_data, tmp_path):
    out = tmp_path / "run"
    code = main(["--learner", "finetune,er", "--data-dir", str(shared_data), "--out", str(out),
                 "--quiet", "--no-plots"], prog="experiments.split_mnist", preset=PRESET)
    assert code == 0
    groups = {g["variant"]: g for g in json.loads((out / "summary.json").read_text())["groups"]}
    assert groups["er"]["n"] == 5
    assert groups["er"]["final_average_accuracy"]["mean"] >= 0.90
    # finetune keeps only the last task: about one task's worth of the 5
    assert groups["finetune"]["final_average_accuracy"]["mean"] < 0.25
