"""Split Fashion-MNIST, online and task-free (the ``split_mnist`` protocol on Fashion-MNIST).

    python -m experiments.split_fashion_mnist --data-dir ../shared/data

5 tasks x 2 classes, MLP 784-256-256-10, batch 10, one pass, SGD lr 0.1, ER buffer 1,000,
5 seeds. Fashion-MNIST is harder than MNIST: measured ER 0.787 +- 0.008 final average accuracy
(README), finetune ~0.2.
"""

import sys

from experiments.split_mnist import PRESET as SPLIT_MNIST
from ocljax.cli import main

PRESET = {**SPLIT_MNIST, "dataset": "fashion_mnist"}

if __name__ == "__main__":
    sys.exit(main(prog="experiments.split_fashion_mnist", description=__doc__, preset=PRESET))
