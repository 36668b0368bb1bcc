"""The chunked-scan driver: a whole online pass of every member as a few compiled calls.

Layout of one compiled call (a *chunk*)::

    shard_map over devices (member axis split across them)
      vmap over members (seeds x hyperparameter grid; schedule values stay unbatched)
        scan over evaluation blocks
          scan over the block's steps: cond(valid) -> learner.update   (online accuracy too)
          switch(eval kind): nothing | continual subset | full test sets at a task's end

The training pool and the test subsets are uploaded once; the host sends only index chunks
``[M, blocks, steps, B]`` and the shared schedule. Keys: member ``m`` with seed ``s`` uses
``k = PRNGKey(s)``; its initial state uses ``fold_in(k, 0)``, step ``t`` uses
``fold_in(fold_in(k, 1), t)`` and the evaluation after step ``t`` uses
``fold_in(fold_in(k, 2), t)``, so results depend neither on chunking nor on the other members.

Diagnostics: with ``OCLJAX_DUMP_HLO=DIR`` set, each run writes its optimized chunk program
(``compiled.as_text()``) to ``DIR/chunk_m{members}_d{devices}.hlo.txt``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ocljax import precision as precision_lib
from ocljax.data.dataset import Dataset
from ocljax.errors import ConfigError
from ocljax.run.evaluation import EvalPool, make_pool, per_task_accuracy
from ocljax.streams.schedule import EVAL_CONTINUAL, EVAL_TASK_END
from ocljax.streams.stream import Stream
from ocljax.types import Batch, Learner

AXIS = "members"


def shard_map(f, *, mesh, in_specs, out_specs):
    """``jax.shard_map`` without replication checks (``jax.experimental.shard_map`` on JAX
    releases older than 0.7, which some accelerator images still ship)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy

    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


@dataclass
class RunResult:
    """Everything a run measured, as host arrays (members along axis 0)."""

    acc: np.ndarray  # [M, E, T] per-task accuracy at each evaluation (E includes step 0)
    eval_step: np.ndarray  # [E] steps trained before the evaluation
    eval_kind: np.ndarray  # [E] EVAL_CONTINUAL or EVAL_TASK_END (step 0 counts as task end)
    eval_task: np.ndarray  # [E] task being trained (-1 for the initial evaluation)
    online_accuracy: np.ndarray  # [M] test-then-train accuracy on the incoming batches
    block_loss: np.ndarray  # [M, n_blocks] mean training loss per evaluation block
    total_steps: int
    batch_size: int
    compile_s: float
    run_s: float
    trace_count: int
    final_state: object = None
    extra: dict = field(default_factory=dict)

    @property
    def n_members(self) -> int:
        return self.acc.shape[0]

    def accuracy_matrix(self) -> np.ndarray:
        """``R[m, i, j]``: accuracy on task j after training through task i: [M, T, T]."""
        rows = np.flatnonzero(self.eval_kind == EVAL_TASK_END)[1:]  # skip the initial eval
        return self.acc[:, rows]

    def initial_accuracy(self) -> np.ndarray:
        """Accuracy of the untrained model on each task: [M, T]."""
        return self.acc[:, 0]


def local_mesh(n_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over the first ``n_devices`` local devices (all by default)."""
    devices = jax.local_devices()
    n = len(devices) if n_devices is None else n_devices
    if not 1 <= n <= len(devices):
        raise ConfigError(f"asked for {n} devices, {len(devices)} are available")
    return jax.sharding.Mesh(np.array(devices[:n]), (AXIS,))


def stack_members(items: Sequence) -> object:
    """Stack per-member pytrees (e.g. HParams NamedTuples) into leaves [M, ...]."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x, np.float32) for x in xs]), *items)


def pad_members(tree, m_padded: int):
    """Repeat the last member so the member axis has ``m_padded`` rows."""

    def pad(a):
        a = np.asarray(a)
        extra = m_padded - a.shape[0]
        return a if extra == 0 else np.concatenate([a, np.repeat(a[-1:], extra, axis=0)])

    return jax.tree.map(pad, tree)


def default_blocks_per_chunk(stream: Stream, target_steps: int = 2000) -> int:
    """Blocks per compiled call: about ``target_steps`` steps, at most the whole stream."""
    per_block = stream.schedule.block_len
    return int(max(1, min(stream.schedule.n_blocks, target_steps // per_block)))


def over_members(f, in_axes, members_per_device: int):
    """``f`` mapped over the leading member axis of the arguments whose ``in_axes`` is 0.

    ``jax.vmap`` in general; with one member per device, the axis is squeezed and ``f`` runs
    unbatched: XLA's CPU backend runs batched matmuls of size 1 markedly slower than plain ones
    (measured: 748 against 526 us per ER step of the MLP on 2 cores), and one member per
    (virtual) device is the CLI's default on CPU.
    """
    if members_per_device != 1:
        return jax.vmap(f, in_axes=in_axes)

    def single(*args):
        args = [jax.tree.map(lambda a: a[0], x) if ax == 0 else x
                for x, ax in zip(args, in_axes, strict=True)]
        return jax.tree.map(lambda a: a[None], f(*args))

    return single


class Program:
    """The compiled pieces of a run for one learner, stream layout and member count."""

    def __init__(self, learner: Learner, stream: Stream, mesh, members_per_device: int):
        self.learner, self.stream, self.mesh = learner, stream, mesh
        self.trace_count = 0
        hide = stream.cfg.task_free or stream.cfg.iid
        evaluate = partial(per_task_accuracy, learner, stream.transform, stream.eval_tasks,
                           stream.n_views, stream.n_tasks)
        n_tasks = stream.n_tasks

        def member_chunk(state, hp, key, aux, idx, steps, eval_kind, end_step, pools):
            self.trace_count += 1  # Python side effect: counts traces, not executions
            train_x, train_y, full, cont = pools
            step_key, eval_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)

            def train_step(carry, s):
                state, correct, loss_sum, n = carry
                idx_s, info = s

                def do(st):
                    n = train_y.shape[0]
                    view, sample = idx_s // n, idx_s % n  # virtual pool index -> view, sample
                    x = stream.transform(aux, view, train_x[sample])
                    y = train_y[sample]
                    batch = Batch(
                        x, y,
                        task=jnp.zeros_like(info.task) if hide else info.task,
                        boundary=jnp.zeros_like(info.boundary) if hide else info.boundary,
                        t=info.t, fresh=info.fresh,
                    )
                    new, metrics = learner.update(st, batch, hp, jax.random.fold_in(step_key,
                                                                                    info.t))
                    logits = metrics.get("stream_logits")
                    if logits is None:
                        logits = learner.predict(st, x, hp)
                    hits = (jnp.argmax(logits, -1) == y).sum() * info.fresh
                    return new, hits.astype(jnp.int32), metrics["loss"].astype(jnp.float32)

                def skip(st):
                    return st, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)

                state, hits, loss = jax.lax.cond(info.valid, do, skip, state)
                return (state, correct + hits, loss_sum + loss, n + info.valid), None

            def block(carry, b):
                state, correct = carry
                idx_b, info_b, kind, t_end = b
                zero = jnp.zeros((), jnp.float32)
                (state, correct, loss_sum, n), _ = jax.lax.scan(
                    train_step, (state, correct, zero, jnp.zeros((), jnp.int32)), (idx_b, info_b)
                )
                k = jax.random.fold_in(eval_key, t_end)
                acc = jax.lax.switch(
                    kind,
                    [lambda st: jnp.zeros((n_tasks,), jnp.float32),
                     lambda st: evaluate(st, hp, k, aux, cont),
                     lambda st: evaluate(st, hp, k, aux, full)],
                    state,
                )
                return (state, correct), (acc, loss_sum / jnp.maximum(n, 1))

            (state, correct), (accs, losses) = jax.lax.scan(
                block, (state, jnp.zeros((), jnp.int32)), (idx, steps, eval_kind, end_step)
            )
            return state, correct, accs, losses

        member = P(AXIS)
        shared = P()
        # state, hp, key, aux, idx are per member; the schedule and the pools are shared.
        chunk = over_members(member_chunk, (0, 0, 0, 0, 0, None, None, None, None),
                             members_per_device)
        self.chunk = jax.jit(
            shard_map(
                chunk, mesh=mesh,
                in_specs=(member,) * 5 + (shared,) * 4,
                out_specs=(member, member, member, member),
            ),
            donate_argnums=(0,),
        )

        def member_init(key, hp, example_x):
            return learner.init(jax.random.fold_in(key, 0), example_x, hp)

        self.init = jax.jit(shard_map(
            over_members(member_init, (0, 0, None), members_per_device), mesh=mesh,
            in_specs=(member, member, shared), out_specs=member,
        ))

        def member_eval(state, hp, key, aux, pool):
            return evaluate(state, hp, jax.random.fold_in(jax.random.fold_in(key, 2), 0), aux,
                            pool)

        self.initial_eval = jax.jit(shard_map(
            over_members(member_eval, (0, 0, 0, 0, None), members_per_device), mesh=mesh,
            in_specs=(member, member, member, member, shared), out_specs=member,
        ))


HEADROOM = 0.9  # fraction of a device's memory a sweep may plan to use
MIN_EVAL_BATCH = 16  # the default evaluation batch shrinks no further to fit memory


@dataclass
class MemoryPlan:
    """Bytes one device needs for a sweep, from XLA's analysis of the compiled chunk.

    The model: each device holds its members' states (``state_per_member`` bytes each), one
    copy of the shared data (training pool and test subsets, ``shared``), and the chunk
    program's temporaries and per-chunk inputs/outputs, which grow with the members per device
    (evaluation activations are bounded by the evaluation batch). ``per_member`` is everything
    but ``shared``, divided by the members on the device.
    """

    members_per_device: int
    state_per_member: int
    shared: int
    program: int  # arguments + outputs + temporaries - aliased (donated) bytes, per device
    limit: int | None  # bytes available on one device (None: unknown)

    @property
    def per_device(self) -> int:
        return self.program

    @property
    def per_member(self) -> int:
        return max(0, self.program - self.shared) // max(self.members_per_device, 1)

    def max_members_per_device(self, headroom: float = HEADROOM) -> int | None:
        if self.limit is None:
            return None
        return int(max(0, self.limit * headroom - self.shared) // max(self.per_member, 1))

    def fits(self, headroom: float = HEADROOM) -> bool:
        return self.limit is None or self.per_device <= self.limit * headroom

    def describe(self) -> str:
        hb = human_bytes
        limit = f" of {hb(self.limit)} available" if self.limit else ""
        return (f"memory: {hb(self.per_member)}/member (state {hb(self.state_per_member)}), "
                f"shared data {hb(self.shared)}; {hb(self.per_device)} per device for "
                f"{self.members_per_device} member(s){limit}")


def human_bytes(n: int) -> str:
    """``n`` bytes as KiB / MiB / GiB with three significant digits."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def device_memory_limit(device) -> int | None:
    """Bytes one device may allocate: the allocator's limit on GPU/TPU; on CPU, the host's
    physical memory shared by all local (virtual) CPU devices."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
        return total // max(len(jax.local_devices(backend="cpu")), 1)
    return None


def tree_bytes(tree) -> int:
    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def default_eval_batch(members_per_device: int, sample_elements: int = 1,
                       rows_per_device: int = 2**19, elements_per_member: int = 2**18) -> int:
    """Test samples per evaluation batch: at most 1,000; at most ``rows_per_device`` member-rows
    on a device (evaluation activations stay bounded whatever the sweep size); and at most
    ``elements_per_member`` input elements per member (measured on 2 CPU cores: evaluating a
    small CNN on 32x32x3 images in batches of 1,000 made a run 1.4x slower than batches of 50,
    its convolution patches no longer fitting in cache). Results do not depend on it."""
    return int(max(1, min(1000, rows_per_device // max(members_per_device, 1),
                          elements_per_member // max(sample_elements, 1))))


def run(
    learner: Learner,
    stream: Stream,
    dataset: Dataset,
    hparams: Sequence,
    seeds: Sequence[int],
    *,
    n_devices: int | None = None,
    blocks_per_chunk: int | None = None,
    eval_batch: int | None = None,
    precision: str = "float32",
    progress: Callable[[int, int, float], None] | None = None,
    log: Callable[[str], None] | None = None,
    keep_state: bool = False,
    memory_limit: int | None = None,
) -> RunResult:
    """Train ``len(seeds)`` members through ``stream`` and evaluate them continually.

    hparams: one learner HParams per member; seeds: one seed per member (the stream must have
    been built for the same seeds, in the same order). Task ids and boundaries are hidden from
    the learner when the stream is ``task_free`` or ``iid``. Members are spread over ``n_devices``
    local devices (all by default), padded to a multiple of the device count.

    Before anything is allocated, the chunk program is compiled and its memory plan (see
    ``MemoryPlan``) checked against the device memory (or ``memory_limit`` bytes per device).
    If it does not fit, the default evaluation batch (``eval_batch=None``) is cut by 4 and the
    chunk recompiled, down to ``MIN_EVAL_BATCH``; a sweep that still cannot fit raises
    ``ConfigError`` saying how many members would. ``log``
    receives the plan and other one-line notes. ``precision`` is one of
    ``ocljax.precision.PRECISIONS``; the learner's model must have been cast with
    ``precision.cast_model`` for ``bf16``.
    """
    M = len(seeds)
    if len(hparams) != M or stream.n_members != M:
        raise ConfigError(
            f"{M} seeds, {len(hparams)} hyperparameter sets and a stream for "
            f"{stream.n_members} members: they must match"
        )
    with precision_lib.matmul_precision(precision):
        return _run(learner, stream, dataset, hparams, seeds, n_devices, blocks_per_chunk,
                    eval_batch, progress, log or (lambda msg: None), keep_state, memory_limit)


def _run(learner, stream, dataset, hparams, seeds, n_devices, blocks_per_chunk, eval_batch,
         progress, log, keep_state, memory_limit) -> RunResult:
    M = len(seeds)
    mesh = local_mesh(n_devices)
    D = mesh.devices.size
    Mp = -(-M // D) * D
    member_sh, shared_sh = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    put_m = partial(jax.device_put, device=member_sh)
    put_s = partial(jax.device_put, device=shared_sh)
    chosen = eval_batch  # an explicit evaluation batch is kept; the default may shrink

    t0 = time.perf_counter()
    program = Program(learner, stream, mesh, Mp // D)
    hp = put_m(pad_members(stack_members(hparams), Mp))
    keys = put_m(pad_members(np.stack([np.asarray(jax.random.PRNGKey(s)) for s in seeds]), Mp))
    aux = put_m(pad_members(stream.aux, Mp))
    example_x = put_s(dataset.train_x[: stream.cfg.batch_size])
    bpc = blocks_per_chunk or default_blocks_per_chunk(stream)
    gen = stream.chunks(bpc)
    first = next(gen)

    def make_pools(eb):
        """The training pool and test subsets, uploaded once, tests cut in batches of ``eb``."""
        return (
            dataset.train_x, dataset.train_y,
            make_pool(dataset.test_x[stream.eval_full], dataset.test_y[stream.eval_full], eb),
            make_pool(dataset.test_x[stream.eval_continual],
                      dataset.test_y[stream.eval_continual], eb),
        )

    def chunk_args(state, chunk, pools):
        idx = put_m(pad_members(chunk.idx, Mp))
        steps, kind, end = put_s((chunk.steps, chunk.eval_kind, chunk.end_step))
        return (state, hp, keys, aux, idx, steps, kind, end, pools)

    # Compile against the abstract state and check the memory plan before allocating. When
    # the default evaluation batch is what does not fit, shrink it (results do not depend on
    # it) before giving up.
    abstract = jax.eval_shape(program.init, keys, hp, example_x)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=member_sh), abstract)
    eval_batch = chosen or default_eval_batch(Mp // D, int(np.prod(dataset.test_x.shape[1:])))
    while True:
        host_pools = make_pools(eval_batch)
        abstract_pools = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shared_sh), host_pools)
        compiled = program.chunk.lower(*chunk_args(abstract, first, abstract_pools)).compile()
        plan = memory_plan(compiled, abstract, host_pools, Mp, D, memory_limit, mesh)
        log(plan.describe())
        if plan.fits() or chosen or eval_batch <= MIN_EVAL_BATCH:
            break
        eval_batch = max(MIN_EVAL_BATCH, eval_batch // 4)
        log(f"memory: retrying with evaluation batches of {eval_batch} test samples")
    if os.environ.get("OCLJAX_DUMP_HLO"):  # diagnostics: the optimized chunk program
        dump = Path(os.environ["OCLJAX_DUMP_HLO"])
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"chunk_m{M}_d{D}.hlo.txt").write_text(compiled.as_text())
    if not plan.fits():
        most = plan.max_members_per_device()
        hb = human_bytes
        raise ConfigError(
            f"this sweep does not fit: {M} member(s) need {hb(plan.per_device)} on each of "
            f"{D} device(s) but a device has {hb(plan.limit)} "
            f"({hb(plan.per_member)} per member, {hb(plan.shared)} shared data); at most "
            f"{most * D} member(s) fit on {D} device(s) - run fewer members, more devices, "
            f"or a smaller model, buffer or evaluation batch"
        )
    pools = put_s(host_pools)
    full_pool: EvalPool = pools[2]
    state = program.init(keys, hp, example_x)
    acc0 = program.initial_eval(state, hp, keys, aux, full_pool)
    compile_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    outputs, ends = [], []
    correct_total = None
    chunk = first
    while chunk is not None:
        state, correct, accs, losses = compiled(*chunk_args(state, chunk, pools))
        outputs.append((accs, losses))
        ends.append(chunk)
        correct_total = correct if correct_total is None else correct_total + correct
        chunk = next(gen, None)
        if progress is not None and len(outputs) > 1:
            jax.block_until_ready(outputs[-2][0])  # the previous chunk; this one is queued
            done = int(ends[-2].end_step.max())
            progress(done, stream.total_steps, time.perf_counter() - t1)
    jax.block_until_ready((state, correct_total))
    run_s = time.perf_counter() - t1
    if progress is not None:
        progress(stream.total_steps, stream.total_steps, run_s)

    accs = np.concatenate([np.asarray(a) for a, _ in outputs], axis=1)[:M]  # [M, nb, T]
    losses = np.concatenate([np.asarray(lo) for _, lo in outputs], axis=1)[:M]
    kind = np.concatenate([c.eval_kind for c in ends])
    keep = kind != 0
    task = np.concatenate([c.block_task for c in ends])[keep]
    steps = np.concatenate([c.end_step for c in ends])[keep]
    n_fresh = int(stream.schedule.steps.fresh.sum()) * stream.cfg.batch_size
    return RunResult(
        acc=np.concatenate([np.asarray(acc0)[:M, None], accs[:, keep]], axis=1),
        eval_step=np.concatenate([[0], steps]).astype(np.int64),
        eval_kind=np.concatenate([[EVAL_TASK_END], kind[keep]]).astype(np.int32),
        eval_task=np.concatenate([[-1], task]).astype(np.int32),
        online_accuracy=np.asarray(correct_total)[:M] / max(n_fresh, 1),
        block_loss=losses[:, : stream.schedule.n_blocks],
        total_steps=stream.total_steps,
        batch_size=stream.cfg.batch_size,
        compile_s=compile_s,
        run_s=run_s,
        trace_count=program.trace_count,
        final_state=jax.tree.map(lambda a: a[:M], state) if keep_state else None,
        extra={"memory": dataclasses.asdict(plan) | {"per_member": plan.per_member},
               "eval_batch": eval_batch},
    )


def memory_plan(compiled, abstract_state, host_pools, Mp: int, D: int, limit: int | None,
                mesh) -> MemoryPlan:
    """The ``MemoryPlan`` of a compiled chunk (see there)."""
    ma = compiled.memory_analysis()
    program = None
    if ma is not None:
        program = (ma.argument_size_in_bytes + ma.output_size_in_bytes
                   + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
    shared = tree_bytes(host_pools)
    state = tree_bytes(abstract_state) // Mp
    if not program:  # no analysis on this backend: count what is known
        program = shared + state * (Mp // D)
    if limit is None:
        limit = device_memory_limit(mesh.devices.flat[0])
    return MemoryPlan(Mp // D, state, shared, int(program), limit)


__all__ = ["EVAL_CONTINUAL", "EVAL_TASK_END", "MemoryPlan", "Program", "RunResult", "local_mesh",
           "run"]
