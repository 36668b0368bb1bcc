"""Linear-probe accuracy of every member's final representation (Soutif-Cormerais et al. 2023,
"A Comprehensive Empirical Evaluation on Online Continual Learning", Sec. 4, "probed accuracy").

At the end of the stream the learner's features (``Learner.features`` of its ``prepare_eval``
state) are frozen; a fresh linear classifier (``ocljax.metrics.probe``) is fitted on a
class-stratified subset of the training pool of the seen classes - every view (task
permutation) of it on permuted streams - and scored on each task's task-end test samples (all
of them unless ``test_per_task`` caps them). It asks how much the representation still knows,
whatever the learner's own head forgot.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import numpy as np

from ocljax.data.dataset import Dataset
from ocljax.metrics import probe
from ocljax.run import driver
from ocljax.streams.stream import Stream, stratified_subset
from ocljax.types import Learner

PER_CLASS = 200  # training samples per class (and view) the probe is fitted on
MEMBERS_AT_ONCE = 16  # members probed together (bounds the features held in memory)


def compile_probe(learner: Learner, stream: Stream, dataset: Dataset, states, hparams, seeds,
                  per_class: int = PER_CLASS, batch: int = probe.BATCH,
                  compiler_options: dict | None = None, compiler=None) -> Callable | None:
    """Compile the linear probe of a sweep's final states; returns ``apply(states) -> [M, T]``
    probed accuracies (None when the learner exposes no ``features``, e.g. the input-blind
    baseline). ``states``: the final learner states with a leading member axis, or only their
    shapes (``jax.ShapeDtypeStruct``, with or without shardings), so that an experiment can
    compile the probe ahead, beside the run's own programs (``ocljax.run.experiment``).
    ``apply`` moves the states it is given to the shardings it was compiled for.
    ``compiler_options``: XLA options of its one compilation (the run's, see
    ``ocljax.run.driver.compiler_options``); ``compiler``: an ``ocljax.run.driver.CompileOnce``
    shared with other variants (whose probe may be the same program)."""
    if learner.features is None:
        return None
    M, T, C = len(seeds), stream.n_tasks, dataset.num_classes
    sub = stratified_subset(dataset.train_y, per_class)
    views = np.repeat(np.arange(stream.n_views, dtype=np.int32), len(sub))
    train_idx = np.tile(sub, stream.n_views)
    test_idx = stream.eval_full
    test_views = np.repeat(np.arange(stream.n_views, dtype=np.int32), len(test_idx))
    test_idx = np.tile(test_idx, stream.n_views)
    # host arrays throughout: eager jnp calls on them would each compile a small program
    data = (dataset.train_x[train_idx], dataset.train_y[train_idx], views,
            dataset.test_x[test_idx], dataset.test_y[test_idx], test_views)
    hp = jax.tree.map(lambda *v: np.stack([np.asarray(a, np.float32) for a in v]), *hparams)
    aux = stream.aux
    seed_arr = np.asarray(seeds, np.int32)  # member m's key: fold_in(PRNGKey(seeds[m]), 3)
    # one jitted function per learner and stream functions in an experiment (``driver.memo``):
    # variants that differ only in their stream's order (finetune and finetune@iid) trace and
    # lower their probe once
    key = ("probe", learner, stream.transform, stream.eval_tasks, T, C, batch,
           min(M, MEMBERS_AT_ONCE))
    run = driver.memo(compiler, key, lambda: probe_program(*key[1:]))
    sharding = getattr(jax.tree.leaves(states)[0], "sharding", None)
    devices = (sharding.mesh.devices.flat if isinstance(sharding, jax.sharding.NamedSharding)
               else sorted(sharding.device_set, key=lambda d: d.id) if sharding is not None
               else [jax.devices()[0]])
    compiled = (compiler or driver.compile_plain)(run.lower(data, states, hp, aux, seed_arr),
                                                  compiler_options, devices)

    def apply(final_states) -> np.ndarray:
        args = jax.device_put((data, final_states, hp, aux, seed_arr),
                              compiled.input_shardings[0])
        return np.asarray(compiled(*args))

    return apply


def probe_program(learner: Learner, transform: Callable, eval_tasks: Callable, T: int, C: int,
                  batch: int, at_once: int) -> Callable:
    """The probe as a jitted function of ``(data, states, hp, aux, seeds)``: the fitting and
    test rows with their views (``data``) are arguments, not constants (a program holding
    MNIST's 12,000 rows as constants took 1.8 s to compile), and members are probed
    ``at_once`` at a time."""

    def member(args, data):
        state, hp, aux, seed = args
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 3)
        x_tr, y_tr, v_tr, x_te, y_te, v_te = data
        prepared = learner.prepare_eval(state, hp, key)
        seen_tr = jax.vmap(lambda v, y: eval_tasks(aux, v, y[None])[0])(v_tr, y_tr)
        task_te = jax.vmap(lambda v, y: eval_tasks(aux, v, y[None])[0])(v_te, y_te)
        return probe.linear_probe_task_accuracy(
            learner.features, prepared, hp,
            transform(aux, v_tr, x_tr), y_tr, seen_tr >= 0,
            transform(aux, v_te, x_te), y_te, task_te >= 0, task_te, T, C, batch=batch)

    return jax.jit(lambda data, *a: jax.lax.map(partial(member, data=data), a,
                                               batch_size=at_once))


def final_probe_accuracy(learner: Learner, stream: Stream, dataset: Dataset, states, hparams,
                         seeds, per_class: int = PER_CLASS, batch: int = probe.BATCH,
                         compiler_options: dict | None = None) -> np.ndarray | None:
    """Probed accuracy on each task for each member: [M, T] (None when the learner exposes no
    ``features``, e.g. the input-blind baseline). ``states`` are the final learner states with
    a leading member axis (``driver.run(..., keep_state=True).final_state``). Compiles the
    probe (``compile_probe``) and applies it."""
    apply = compile_probe(learner, stream, dataset, states, hparams, seeds, per_class, batch,
                          compiler_options)
    return None if apply is None else apply(states)
