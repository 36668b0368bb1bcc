"""Quick-start: finetune vs ER vs the i.i.d. upper bound on class-incremental digits.

    python -m experiments.quickstart

scikit-learn's bundled digits (1,797 real 8x8 images, no download) as a 5-task
class-incremental stream (2 classes per task), batch 10, 3 passes per incoming batch, MLP
64-64, SGD lr 0.1, ER with a 200-sample reservoir, 5 seeds each. Each variant is one compiled
sweep over its 5 seeds. Prints final average accuracy, average anytime accuracy and forgetting
(mean +- std over seeds) and writes a run directory with plots. Expect finetune ~0.2 (one
task's worth), ER ~0.8, i.i.d. ~0.9 final average accuracy.
"""

import sys

from ocljax.cli import main

PRESET = {
    "learner": "finetune,er,finetune@iid",
    "dataset": "digits",
    "seeds": 5,
    "set": ["width=64", "buffer_size=200", "passes=3", "eval_every=10", "eval_per_task=0",
            "near_future=5"],
}

if __name__ == "__main__":
    sys.exit(main(prog="experiments.quickstart", description=__doc__, preset=PRESET))
