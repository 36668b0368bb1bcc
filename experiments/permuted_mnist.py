"""Permuted MNIST, online (domain-incremental).

    python -m experiments.permuted_mnist --data-dir ../shared/data

10 tasks, each a fixed random pixel permutation (drawn per seed) of 1,000 training samples
(the GEM protocol of Lopez-Paz & Ranzato 2017 uses 20 x 1,000; pass --n-tasks 20), tested on
2,000 test images per task; MLP 784-256-256-10, batch 10, one pass, SGD lr 0.1, ER buffer 500,
5 seeds, task-free.
"""

import sys

from ocljax.cli import main

PRESET = {
    "learner": "finetune,er,finetune@iid",
    "dataset": "mnist",
    "stream": "permuted",
    "n_tasks": 10,
    "seeds": 5,
    "task_free": True,
    "set": ["samples_per_task=1000", "test_per_task=2000", "eval_per_task=500",
            "buffer_size=500", "lr=0.1", "batch_size=10", "eval_every=25", "near_future=10"],
}

if __name__ == "__main__":
    sys.exit(main(prog="experiments.permuted_mnist", description=__doc__, preset=PRESET))
