"""Metrics over the continual evaluations made during training (not only at task ends).

Inputs: ``acc [..., E, T]`` per-task accuracy at each evaluation, ``eval_task [E]`` the task
being trained when evaluation ``e`` ran (-1 for the evaluation before training), as returned by
``ocljax.run.driver.RunResult``.
"""

from __future__ import annotations

import numpy as np


def seen_task_mask(eval_task) -> np.ndarray:
    """[E, T'] bool: task j counts at evaluation e when j <= eval_task[e]."""
    eval_task = np.asarray(eval_task)
    T = int(eval_task.max()) + 1
    return np.arange(T)[None, :] <= eval_task[:, None]


def anytime_accuracy(acc, eval_task) -> np.ndarray:
    """Average accuracy over the tasks seen so far at each evaluation: [..., E] (NaN before
    training). The quantity averaged by ``average_anytime_accuracy``."""
    acc = np.asarray(acc, np.float64)
    seen = seen_task_mask(eval_task)
    T = acc.shape[-1]
    seen = np.pad(seen, ((0, 0), (0, T - seen.shape[1])))
    with np.errstate(invalid="ignore"):
        return (acc * seen).sum(-1) / seen.sum(-1)


def average_anytime_accuracy(acc, eval_task, eval_step=None) -> np.ndarray:
    """AAA: accuracy on the seen tasks averaged over the whole stream, so a method that is
    only good at task ends scores lower (Caccia et al. 2022, "New Insights on Reducing Abrupt
    Representation Change in Online Continual Learning", Sec. 5, "AAA"; Koh et al. 2022,
    "A_AUC"): [...] over the evaluations made during training (``eval_task >= 0``).

    With ``eval_step`` [E] (steps trained when each evaluation ran, the first one before
    training), each evaluation is weighted by the steps since the previous one: the area under
    the anytime-accuracy curve divided by the stream's length, each evaluation standing for
    the steps that led to it. Evenly spaced evaluations (the papers' protocol) weigh the same;
    a schedule that evaluates more often in places - dense evaluation after each boundary, a
    task's last, shorter block - does not tilt the average towards them. Without
    ``eval_step``, the evaluations' plain mean."""
    a = anytime_accuracy(acc, eval_task)
    during = np.asarray(eval_task) >= 0
    if eval_step is None:
        return a[..., during].mean(-1)
    step = np.asarray(eval_step, np.float64)
    weight = np.diff(step, prepend=step[0])[during]
    if weight.sum() <= 0:  # no step between evaluations: nothing to weigh them by
        return a[..., during].mean(-1)
    return (a[..., during] * weight).sum(-1) / weight.sum()


def min_accuracy(acc, eval_task) -> np.ndarray:
    """min-ACC at the end of the stream (De Lange et al. 2023, "Continual Evaluation for
    Lifelong Learning: Identifying the Stability Gap", Sec. 3.2):
    (1/(T-1)) sum_{i<T-1} min_{e: eval_task[e] > i} acc[e, i], the worst accuracy each earlier
    task falls to after its training ended (evaluations at task i's own end excluded). It
    exposes the *stability gap*: transient drops that task-end evaluations never see.
    NaN with one task."""
    acc = np.asarray(acc, np.float64)
    eval_task = np.asarray(eval_task)
    T = acc.shape[-1]
    if T == 1:
        return np.full(acc.shape[:-2], np.nan)
    mins = []
    for i in range(T - 1):
        after = eval_task > i
        mins.append(acc[..., after, i].min(-1))
    return np.mean(mins, axis=0)


def worst_case_accuracy(acc, eval_task) -> np.ndarray:
    """WC-ACC at the end of the stream (De Lange et al. 2023, Sec. 3.2):
    (1/T) acc_final[T-1] + (1 - 1/T) min-ACC, trading the current task's accuracy against the
    worst-case accuracy on earlier ones."""
    acc = np.asarray(acc, np.float64)
    T = acc.shape[-1]
    last = acc[..., -1, T - 1]
    if T == 1:
        return last
    return last / T + (1 - 1 / T) * min_accuracy(acc, eval_task)
