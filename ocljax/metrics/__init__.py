"""Continual-learning metrics: over the accuracy matrix and over continual evaluations.

Online (test-then-train) accuracy is computed inside the compiled scan by the driver
(``RunResult.online_accuracy``): each incoming batch is scored before the learner trains on it.
"""

from ocljax.metrics.continual import (
    anytime_accuracy,
    average_anytime_accuracy,
    min_accuracy,
    worst_case_accuracy,
)
from ocljax.metrics.matrix import (
    average_incremental_accuracy,
    backward_transfer,
    final_average_accuracy,
    forgetting,
    forward_transfer,
)

__all__ = [
    "anytime_accuracy",
    "average_anytime_accuracy",
    "average_incremental_accuracy",
    "backward_transfer",
    "final_average_accuracy",
    "forgetting",
    "forward_transfer",
    "min_accuracy",
    "worst_case_accuracy",
]
