"""Rotated MNIST, online (domain-incremental).

    python -m experiments.rotated_mnist --data-dir ../shared/data

The "MNIST rotations" protocol of Lopez-Paz & Ranzato 2017 (GEM, Sec. 5): 20 tasks of 1,000
training samples, task k's images rotated by an angle drawn in [9k, 9(k + 1)) degrees (0 to
180 over the stream; drawn per seed, `--set max_rotation=...`), tested on 2,000 test images
per task under its rotation; MLP 784-256-256-10, batch 10, one pass, SGD lr 0.1, ER buffer
500, 5 seeds, task-free.
"""

import sys

from ocljax.cli import main

PRESET = {
    "learner": "finetune,er,finetune@iid",
    "dataset": "mnist",
    "stream": "rotated",
    "n_tasks": 20,
    "seeds": 5,
    "task_free": True,
    "set": ["samples_per_task=1000", "test_per_task=2000", "eval_per_task=500",
            "buffer_size=500", "lr=0.1", "batch_size=10", "eval_every=25", "near_future=10"],
}

if __name__ == "__main__":
    sys.exit(main(prog="experiments.rotated_mnist", description=__doc__, preset=PRESET))
