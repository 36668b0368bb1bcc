"""Split Fashion-MNIST, online and task-free (same protocol as ``split_mnist``).

    python -m experiments.split_fashion_mnist --data-dir ../shared/data

5 tasks x 2 classes, MLP 784-256-256-10, batch 10, one pass, SGD lr 0.1, ER buffer 1,000,
5 seeds. Fashion-MNIST is harder than MNIST: expect ER around 0.7-0.8 final average accuracy
and finetune near 0.2.
"""

import sys

from ocljax.cli import main

PRESET = {
    "learner": "finetune,er,er_ncm,finetune@iid",
    "dataset": "fashion_mnist",
    "seeds": 5,
    "task_free": True,
    "set": ["buffer_size=1000", "replay_batch=10", "lr=0.1", "batch_size=10", "passes=1",
            "eval_every=100"],
}

if __name__ == "__main__":
    sys.exit(main(prog="experiments.split_fashion_mnist", description=__doc__, preset=PRESET))
