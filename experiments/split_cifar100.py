"""Split CIFAR-100, online and task-free, with the reduced ResNet-18.

    python -m experiments.split_cifar100 --data-dir DIR   # or OCLJAX_DATA_DIR / tfds

The protocol of the OCL surveys (Mai et al. 2022, "Online continual learning in image
classification: An empirical survey", Sec. 5): 20 tasks x 5 classes (fixed order) over the 100
fine labels, reduced ResNet-18 (nf 20), batch 10, one pass, SGD lr 0.1, task boundaries hidden
from the learner; ER with a 5,000-sample reservoir and 10 replayed samples per step; 5 seeds.
The full test set at each of the 20 task ends (the accuracy matrix, 200,000 forward passes)
costs about two thirds of the training compute; continual evaluation in the middle of each
250-step task, on 50 test images per task, adds 20,000.

DIR holds ``cifar-100-python.tar.gz`` (md5-checked) or its extracted ``cifar-100-python``
folder, in DIR or DIR/cifar100. Not measured here (no CIFAR files on the development
machines); a full run wants a GPU.
"""

import sys

from ocljax.cli import main

PRESET = {
    "learner": "finetune,er,finetune@iid",
    "dataset": "cifar100",
    "model": "resnet18",
    "seeds": 5,
    "task_free": True,
    "n_tasks": 20,
    "set": ["buffer_size=5000", "replay_batch=10", "lr=0.1", "batch_size=10", "passes=1",
            "eval_every=125", "eval_per_task=50"],
}

if __name__ == "__main__":
    sys.exit(main(prog="experiments.split_cifar100", description=__doc__, preset=PRESET))
