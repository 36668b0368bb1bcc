"""Split CIFAR-10, online and task-free, with the reduced ResNet-18.

    python -m experiments.split_cifar10 --data-dir DIR   # or OCLJAX_DATA_DIR / tfds

The protocol of the OCL surveys (Mai et al. 2022, "Online continual learning in image
classification: An empirical survey", Sec. 5; Soutif-Cormerais et al. 2023): 5 tasks x 2
classes (fixed order), reduced ResNet-18 (nf 20, Lopez-Paz & Ranzato 2017), batch 10, one
pass, SGD lr 0.1, task boundaries hidden from the learner; ER with a 1,000-sample reservoir and
10 replayed samples per step; 5 seeds. Continual evaluation every 250 steps on 200 test images
per task (15,000 forward passes in all) and the full test set at every task end (50,000) cost
about a fifth of the training compute.

DIR holds ``cifar-10-python.tar.gz`` (md5-checked) or its extracted ``cifar-10-batches-py``
folder, in DIR or DIR/cifar10. Not measured here (no CIFAR files on the development machines);
on 2 CPU cores the reduced ResNet-18 trains at about 65 samples/s per seed, so a full run wants
a GPU.
"""

import sys

from ocljax.cli import main

PRESET = {
    "learner": "finetune,er,finetune@iid",
    "dataset": "cifar10",
    "model": "resnet18",
    "seeds": 5,
    "task_free": True,
    "n_tasks": 5,
    "set": ["buffer_size=1000", "replay_batch=10", "lr=0.1", "batch_size=10", "passes=1",
            "eval_every=250", "eval_per_task=200"],
}

if __name__ == "__main__":
    sys.exit(main(prog="experiments.split_cifar10", description=__doc__, preset=PRESET))
