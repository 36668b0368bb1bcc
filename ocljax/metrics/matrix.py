"""Metrics over an accuracy matrix, naming the literature's conflicting definitions explicitly.

``R[i, j]`` is the accuracy on task ``j``'s test set after training through task ``i``
(T x T, tasks 0-based). Every function also accepts leading batch axes ``[..., T, T]`` (e.g.
members) and reduces only the last two. Quantities undefined for a single task are NaN.
"""

from __future__ import annotations

import numpy as np


def as_matrix(R) -> np.ndarray:
    """``R`` as a float array [..., T, T]; ``ValueError`` if it is not square."""
    R = np.asarray(R, np.float64)
    if R.ndim < 2 or R.shape[-1] != R.shape[-2]:
        raise ValueError(f"accuracy matrix must be [..., T, T], got shape {R.shape}")
    return R


def final_average_accuracy(R) -> np.ndarray:
    """ACC = (1/T) sum_j R[T-1, j]: mean accuracy over all tasks at the end of the stream
    (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory", Sec. 2, "ACC")."""
    return as_matrix(R)[..., -1, :].mean(-1)


def average_incremental_accuracy(R) -> np.ndarray:
    """(1/T) sum_i [(1/(i+1)) sum_{j<=i} R[i, j]]: the mean over time of the average accuracy on
    the tasks seen so far (Rebuffi et al. 2017, "iCaRL", Sec. 4; Douillard et al. 2020)."""
    R = as_matrix(R)
    T = R.shape[-1]
    seen = np.tril(np.ones((T, T)))
    return ((R * seen).sum(-1) / seen.sum(-1)).mean(-1)


def forgetting(R, reference: str = "max") -> np.ndarray:
    """Average forgetting of tasks ``j < T-1`` at the end of the stream.

    reference="max" (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning", Sec. 4,
        forgetting measure): f_j = max_{l < T-1} R[l, j] - R[T-1, j].
    reference="first" (Avalanche's ``ExperienceForgetting``): f_j = R[j, j] - R[T-1, j], the
        drop from the accuracy measured right after training on task j.
    Returns (1/(T-1)) sum_{j<T-1} f_j; NaN when T == 1.
    """
    R = as_matrix(R)
    T = R.shape[-1]
    if T == 1:
        return np.full(R.shape[:-2], np.nan)
    final = R[..., -1, :-1]
    if reference == "max":
        ref = R[..., :-1, :-1].max(-2)
    elif reference == "first":
        ref = np.diagonal(R, axis1=-2, axis2=-1)[..., :-1]
    else:
        raise ValueError(f"reference must be 'max' or 'first', got {reference!r}")
    return (ref - final).mean(-1)


def backward_transfer(R, variant: str = "final_row") -> np.ndarray:
    """Backward transfer (negative = forgetting).

    variant="final_row" (Lopez-Paz & Ranzato 2017, Sec. 2, "BWT"):
        (1/(T-1)) sum_{j<T-1} (R[T-1, j] - R[j, j]).
    variant="all_pairs" (Diaz-Rodriguez et al. 2018, "Don't forget, there is more than
        forgetting", Sec. 3): sum_{i>j} (R[i, j] - R[j, j]) / (T(T-1)/2), every later row.
    NaN when T == 1.
    """
    R = as_matrix(R)
    T = R.shape[-1]
    if T == 1:
        return np.full(R.shape[:-2], np.nan)
    diag = np.diagonal(R, axis1=-2, axis2=-1)
    if variant == "final_row":
        return (R[..., -1, :-1] - diag[..., :-1]).mean(-1)
    if variant == "all_pairs":
        lower = np.tril(np.ones((T, T)), k=-1)
        return ((R - diag[..., None, :]) * lower).sum((-2, -1)) / (T * (T - 1) / 2)
    raise ValueError(f"variant must be 'final_row' or 'all_pairs', got {variant!r}")


def forward_transfer(R, baseline=None) -> np.ndarray:
    """Forward transfer (Lopez-Paz & Ranzato 2017, Sec. 2, "FWT"):
    (1/(T-1)) sum_{j>=1} (R[j-1, j] - b_j), the accuracy on a task just *before* training on it,
    relative to ``baseline`` b ([..., T]: usually the untrained model's accuracy, which the
    driver records at step 0). ``baseline=None`` takes b = 0. NaN when T == 1."""
    R = as_matrix(R)
    T = R.shape[-1]
    if T == 1:
        return np.full(R.shape[:-2], np.nan)
    before = np.diagonal(R, offset=1, axis1=-2, axis2=-1)  # R[j-1, j]
    b = 0.0 if baseline is None else np.asarray(baseline, np.float64)[..., 1:]
    return (before - b).mean(-1)
