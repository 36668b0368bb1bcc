"""Rotated MNIST, online (domain-incremental).

    python -m experiments.rotated_mnist --data-dir ../shared/data

The stream of Lopez-Paz & Ranzato 2017's "MNIST rotations" (GEM, Sec. 5): 20 tasks of 1,000
training samples, task k's images rotated by an angle drawn in [9k, 9(k + 1)) degrees (0 to
180 over the stream; drawn per seed, `--set max_rotation=...`), batch 10, one pass. The rest
follows this library's other MNIST presets rather than GEM's (two hidden layers of 100 units,
the whole test set per task): 2,000 test images per task under its rotation, MLP
784-256-256-10, SGD lr 0.1, ER buffer 500, 5 seeds, task-free.
"""

import sys

from experiments import permuted_mnist
from ocljax.cli import main

# permuted MNIST's settings, on the rotated stream with GEM's 20 tasks
PRESET = {**permuted_mnist.PRESET, "stream": "rotated", "n_tasks": 20}

if __name__ == "__main__":
    sys.exit(main(prog="experiments.rotated_mnist", description=__doc__, preset=PRESET))
