"""The stability gap on split MNIST, at full resolution (De Lange et al. 2023, "Continual
Evaluation for Lifelong Learning: Identifying the Stability Gap", ICLR 2023).

    python -m experiments.stability_gap --data-dir ../shared/data --out runs/stability_gap
    python -m ocljax.report runs/stability_gap --out runs/stability_gap/report

The split-MNIST protocol of ``experiments.split_mnist`` (ER, buffer 1,000, 10 replayed per
step; finetune for contrast) evaluated every 5 steps during the first 300 steps after each task
boundary and every 100 steps elsewhere, on 500 test images per task. The report's
``stability_gap.png`` shows each earlier task's accuracy dropping right after a boundary and
recovering (ER) or not (finetune); ``min acc`` and ``worst-case acc`` in the table measure the
dip, which task-end evaluation alone never sees. Near-future accuracy (S = 10 batches) and the
input-blind baseline are recorded beside online accuracy.
"""

import sys

from experiments.split_mnist import PRESET as SPLIT_MNIST
from ocljax.cli import main

PRESET = {
    **SPLIT_MNIST,
    "learner": "finetune,er",
    "set": [*SPLIT_MNIST["set"], "eval_dense_every=5", "eval_dense_window=300"],
}

if __name__ == "__main__":
    sys.exit(main(prog="experiments.stability_gap", description=__doc__, preset=PRESET))
