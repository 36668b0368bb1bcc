"""The chunked-scan driver: a whole online pass of every member as a few compiled calls.

Layout of one compiled call (a *chunk*)::

    shard_map over devices (member axis split across them)
      vmap over members (seeds x hyperparameter grid; schedule values stay unbatched)
        scan over evaluation blocks
          loop over the block's valid steps -> learner.update   (online accuracy too)
          switch(eval kind): nothing | continual subset | full test sets at a task's end

The training pool and the test subsets are uploaded once; the host sends only index chunks
``[M, blocks, steps, B]`` and the shared schedule. Keys: member ``m`` with seed ``s`` uses
``k = PRNGKey(s)``; its initial state uses ``fold_in(k, 0)``, step ``t`` uses
``fold_in(fold_in(k, 1), t)`` and the evaluation after step ``t`` uses
``fold_in(fold_in(k, 2), t)``, so results depend neither on chunking nor on the other members.

Compile effort (``compile_mode``), on a CPU (other backends always compile with XLA's
defaults):

- ``fast`` compiles every program of the run with LLVM's optimisation off
  (``xla_backend_optimization_level=0``) and with XLA:CPU's elemental emitters instead of its
  MLIR fusion emitters (``xla_cpu_use_fusion_emitters=False``): compilation takes 0.25-0.45 of
  the time, and the matmuls, which XLA:CPU hands to its GEMM library either way, keep their
  speed, while the fused elementwise code runs about 2.5x slower.
- ``optimized`` compiles with LLVM at ``-O2`` (``xla_backend_optimization_level=2``) instead of
  XLA's default ``-O3``: 25-45% less compile time for equal run time (measured on the MLP,
  the small CNN and the reduced ResNet-18, one seed and sweeps; docs/performance.md). MLP
  and plain-CNN runs give bit-identical numbers either way; models with BatchNorm round
  differently (so do their results, within the spread over seeds).
- ``full`` keeps XLA's defaults (``-O3``): the numbers ocljax's BatchNorm models gave before
  the ``-O2`` default, and the last few percent of a long run, if a machine shows any.
- ``auto`` (the default) chooses ``fast`` when a member's run is short, ``optimized``
  otherwise: its estimated training work (XLA's FLOP count of one member's lowered update
  times the stream's steps, at ``AUTO_CPU_FLOPS``) is under ``AUTO_FAST_BELOW_S``.

Options the installed XLA does not know are dropped (``known_options``). The ``auto``
estimate is per member, not per sweep, so that the choice, and with it the rounding of every
number, is the same for a member of a sweep and for the single run with its seed (fast and
optimised code round differently, and over a long stream such differences can grow: 0.729
against 0.731 final accuracy for online EWC on permuted MNIST). A learner that prepares its
evaluation (``prepare_eval`` is not the identity: GDumb retrains from scratch, iCaRL herds,
SCR and ER-NCM take class means) has evaluation work this count does not see (XLA counts a
loop body once), so its runs compile optimised: GDumb's split-MNIST row ran 2.8x slower with
fast code. The estimate depends only on the run's plan (not on the device layout or the
evaluation batch), so a resumed run makes the same choice.

A run is two steps: ``compile_sweep`` traces and compiles every program and checks the memory
plan, allocating nothing but the members' hyperparameters and keys, and ``execute`` runs the
compiled ``Sweep``; ``run`` does both. Several sweeps can compile at once on threads (XLA
compiles without the GIL): ``ocljax.run.experiment.CompileAhead`` compiles an experiment's
variants that way.

Diagnostics: with ``OCLJAX_DUMP_HLO=DIR`` set, each run writes its optimized chunk program
(``compiled.as_text()``) to ``DIR/chunk_m{members}_d{devices}.hlo.txt``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ocljax import precision as precision_lib
from ocljax.data.dataset import Dataset
from ocljax.errors import ConfigError
from ocljax.learners import blind
from ocljax.run import evaluation
from ocljax.run.checkpoint import Checkpointer, Interrupted
from ocljax.run.evaluation import make_pool, per_task_accuracy
from ocljax.streams.schedule import EVAL_CONTINUAL, EVAL_TASK_END, evaluation_chunk
from ocljax.streams.stream import Stream
from ocljax.sweep.distributed import agree, to_host
from ocljax.types import Array, Batch, Learner, identity_prepare_eval
from ocljax.units import human_bytes

AXIS = "members"
COMPILE_MODES = ("auto", "fast", "optimized", "full")
FAST_OPTIONS = {  # XLA:CPU, --compile fast
    "xla_backend_optimization_level": 0,  # LLVM -O0
    "xla_cpu_use_fusion_emitters": False,  # the elemental emitters: shorter compiles
    # one LLVM module, not split for parallel code generation: fast programs are small, and
    # the variants already compile on parallel threads (quick-start, 2 cores: XLA's compile
    # time summed over threads 0.65-0.8x, bit-identical code)
    "xla_cpu_parallel_codegen_split_count": 1,
}
OPTIMIZED_OPTIONS = {  # XLA:CPU, --compile optimized
    "xla_backend_optimization_level": 2,  # LLVM -O2 (XLA's default: -O3)
}
AUTO_FAST_BELOW_S = 1.0  # auto: compile fast when one member's estimated work is shorter
AUTO_CPU_FLOPS = 2e10  # one member's training FLOP/s assumed by that estimate (2 cores: 30-80)


def check_compile_mode(mode: str) -> None:
    """Raise ``ConfigError`` unless ``mode`` is one of ``COMPILE_MODES``."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got "
                          f"{mode!r}")


def compile_effort(mode: str, backend: str, estimated_flops: float | None) -> str:
    """The effort a run compiles with under ``mode`` (module docstring): ``fast``,
    ``optimized`` or ``full``; always ``full`` (XLA's defaults) off a CPU, and ``auto`` on a
    CPU is ``fast`` for a run of fewer than ``AUTO_FAST_BELOW_S`` estimated seconds
    (``estimated_flops`` at ``AUTO_CPU_FLOPS``; unknown counts as long), else ``optimized``."""
    check_compile_mode(mode)
    if backend != "cpu":
        return "full"
    if mode != "auto":
        return mode
    short = estimated_flops is not None and estimated_flops / AUTO_CPU_FLOPS < AUTO_FAST_BELOW_S
    return "fast" if short else "optimized"


def compiler_options(mode: str, backend: str, estimated_flops: float | None) -> dict | None:
    """XLA compiler options of a run under ``mode`` (see ``compile_effort``); None: XLA's
    defaults."""
    return effort_options(compile_effort(mode, backend, estimated_flops))


def effort_options(effort: str) -> dict | None:
    """XLA compiler options of a compile effort (``compile_effort``'s answer); None: XLA's
    defaults (``full``)."""
    if effort == "fast":
        return fast_options()
    if effort == "optimized":
        return optimized_options()
    return None


def fast_options() -> dict:
    """``FAST_OPTIONS`` that this jaxlib's XLA knows (``known_options``)."""
    return known_options(FAST_OPTIONS)


def optimized_options() -> dict | None:
    """``OPTIMIZED_OPTIONS`` that this jaxlib's XLA knows (``known_options``; None if none)."""
    return known_options(OPTIMIZED_OPTIONS) or None


def known_options(options: dict) -> dict:
    """``options`` less any this jaxlib's XLA does not know: XLA's options come and go
    between releases, and one it does not know fails every compilation."""
    return {k: v for k, v in options.items() if _option_known(k, v)}


@functools.cache
def _option_known(name: str, value) -> bool:
    """Whether XLA compiles a trivial program with the option ``name=value``."""
    try:
        jax.jit(lambda x: x + 1).lower(np.float32(0)).compile({name: value})
    except jax.errors.JaxRuntimeError as err:
        if "compile option" in str(err):  # INVALID_ARGUMENT: No such compile option: ...
            return False
        raise
    return True


class CompileOnce:
    """Compiles each distinct program once, for every sweep that asks for it.

    Variants of one experiment often lower to the same programs: finetune and its i.i.d.
    upper bound differ only in the order of the stream, which is data. Two
    lowerings share one executable when their StableHLO text (which holds the program's
    constants), XLA options, argument and result structure and devices are equal; a lowering
    another thread is compiling waits for it instead of compiling it again. The persistent
    compilation cache would also catch such repeats, but only after the first compile has
    finished and only when the cache is on. A lowering whose constants JAX passes apart from
    its text (``jax_use_simplified_jaxpr_constants``) is compiled on its own.
    Thread-safe; holds its executables until it is dropped (one per experiment)."""

    def __init__(self):
        self._jobs: dict[tuple, Future] = {}
        self._made: dict = {}  # ``memo``'s objects
        self._lock = threading.Lock()
        self.compiled = 0  # programs compiled
        self.shared = 0  # lowerings that got an executable compiled for another

    def memo(self, key, make: Callable[[], object]) -> object:
        """The object ``make()`` returned for ``key`` in an earlier call, or ``make()`` now:
        e.g. one ``Program`` for sweeps with the same learner and ``ProgramSpec``, whose
        jitted functions then trace and lower once (``jit`` caches both per function)."""
        with self._lock:
            if key not in self._made:
                self._made[key] = make()
            return self._made[key]

    def __call__(self, lowered, options: dict | None, devices) -> object:
        """``lowered.compile(options)``, or the executable of an equal lowering; ``devices``:
        the program's devices (e.g. ``mesh.devices.flat``), part of what must be equal."""
        consts = getattr(getattr(lowered, "_lowering", None), "const_args", None)
        if consts is None or len(consts):
            return lowered.compile(options)
        digest = hashlib.sha256(lowered.as_text().encode()).hexdigest()
        key = (digest, repr(sorted((options or {}).items())), lowered.in_tree,
               lowered.out_tree, tuple(d.id for d in devices))
        with self._lock:
            job = self._jobs.get(key)
            mine = job is None
            if mine:
                job = self._jobs[key] = Future()
                self.compiled += 1
            else:
                self.shared += 1
        if mine:
            try:
                job.set_result(lowered.compile(options))
            except BaseException as err:
                with self._lock:  # a later request compiles it again (and meets the error)
                    del self._jobs[key]
                job.set_exception(err)
                raise
        return job.result()


def memo(compiler, key, make: Callable[[], object]) -> object:
    """``compiler.memo(key, make)`` for a ``CompileOnce``; ``make()`` for any other compiler
    (``compile_plain``, None), and for a key that cannot be hashed (a learner whose config
    holds a list)."""
    if getattr(compiler, "memo", None) is None:
        return make()
    try:
        hash(key)
    except TypeError:
        return make()
    return compiler.memo(key, make)


def compile_plain(lowered, options: dict | None, devices) -> object:
    """``lowered.compile(options)``: the compiler of a sweep compiled on its own."""
    return lowered.compile(options)


def estimated_work(learner: Learner, stream: Stream, step_flops: float | None) -> float | None:
    """One member's training FLOPs for ``compile_mode="auto"``: its update FLOPs x the stream's
    steps; None (unknown: compile optimised) without a FLOP count or when the learner prepares
    its evaluation (``prepare_eval`` not the identity), whose work, e.g. GDumb's retraining,
    the count does not cover. Independent of the number of members (module docstring)."""
    if step_flops is None or learner.prepare_eval is not identity_prepare_eval:
        return None
    return step_flops * stream.total_steps


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

    acc: np.ndarray  # [M, E, T] per-task (class-IL) accuracy at each evaluation (E: step 0 too)
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
    task_aware: np.ndarray | None = None  # [M, E, T] task-aware accuracy (``evaluation``)
    cumulative: np.ndarray | None = None  # [M, E, T] cumulative accuracy on tasks 0..k
    near_future_accuracy: np.ndarray | None = None  # [M] (NaN when ``near_future`` is off)
    blind_online_accuracy: np.ndarray | None = None  # [M] the input-blind baseline's ...
    blind_near_future_accuracy: np.ndarray | None = None  # [M] ... on the same batches
    diverged_step: np.ndarray | None = None  # [M] int: step a member diverged at, -1 if never
    diverged_cause: np.ndarray | None = None  # [M] int: 1 loss, 2 state (results.DIVERGED_CAUSES)

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
    """A 1-D mesh over the first ``n_devices`` local devices (all by default). In a
    multi-process run (``ocljax.sweep.distributed``) the mesh spans every device of every
    process, in process order, and ``n_devices`` must be None or their number."""
    if jax.process_count() > 1:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        if n_devices not in (None, len(devices)):
            raise ConfigError(f"a multi-process run uses all {len(devices)} devices of its "
                              f"{jax.process_count()} processes; got --devices {n_devices}")
        return jax.sharding.Mesh(np.array(devices), (AXIS,))
    devices = jax.local_devices()
    n = len(devices) if n_devices is None else n_devices
    if not 1 <= n <= len(devices):
        raise ConfigError(f"asked for {n} devices, {len(devices)} are available")
    return jax.sharding.Mesh(np.array(devices[:n]), (AXIS,))


def put_global(tree, sharding):
    """Host arrays (the same full copy on every process) as arrays laid out by ``sharding``:
    ``device_put`` in one process; across processes each feeds its own devices' shards."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda a: jax.make_array_from_callback(
        np.shape(a), sharding, lambda index, a=a: np.asarray(a)[index]), tree)


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


HEALTHY = np.array([-1, 0], np.int32)  # (diverged step, cause) of a member that is fine


def all_finite(tree) -> Array:
    """True when every floating-point leaf of ``tree`` is finite."""
    leaves = [jnp.isfinite(a).all() for a in jax.tree.leaves(tree)
              if jnp.issubdtype(a.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.ones((), bool)


def isolate_divergence(start, state, health, bad_t, t_end):
    """Fault isolation at the end of an evaluation block, for one member.

    A member whose training loss was non-finite at some step of the block (``bad_t`` >= 0,
    cause 1) or whose state holds a non-finite value at the block's end (cause 2) is marked
    diverged at that step and *frozen*: its state is reset to the block's start and stays
    there (each later block resets it again), so its evaluations, checkpoints and plots show
    the last good model. Members are independent under ``vmap``, so the others' numbers are
    unaffected. The check costs one pass over the state per block, not per step."""
    newly = (health[0] < 0) & ((bad_t >= 0) | ~all_finite(state))
    step = jnp.where(newly, jnp.where(bad_t >= 0, bad_t, t_end), health[0])
    cause = jnp.where(newly, jnp.where(bad_t >= 0, 1, 2), health[1])
    frozen = step >= 0
    state = jax.tree.map(lambda a, b: jnp.where(frozen, a, b), start, state)
    return state, jnp.stack([step, cause]).astype(jnp.int32)


@dataclass(frozen=True)
class ProgramSpec:
    """Everything a ``Program`` takes from its stream: the stream's functions and the static
    settings that change the program (array shapes aside, which ``jit`` keys on itself).
    Streams with equal specs share their programs' traces (``CompileOnce.memo``): e.g. a
    stream and its i.i.d. twin, whose differences (order, hidden task ids) are data."""

    transform: Callable
    eval_tasks: Callable
    n_views: int
    n_tasks: int
    near_future: bool  # also score each step's model on a later batch
    blind_window: int  # labels the input-blind baseline remembers (0: not tracked)
    repeats: bool = False  # batches train more than one step (passes > 1)


def program_spec(stream: Stream) -> ProgramSpec:
    """The ``ProgramSpec`` of ``stream``."""
    return ProgramSpec(stream.transform, stream.eval_tasks, stream.n_views, stream.n_tasks,
                       stream.cfg.near_future > 0, stream.cfg.blind_window,
                       stream.cfg.passes > 1)


def hides_tasks(stream: Stream) -> bool:
    """Whether the learner is shown zeros for task ids and boundaries (task-free and i.i.d.
    streams); they are zeroed in each chunk's schedule on the host, so that hiding them does
    not change the program."""
    return stream.cfg.task_free or stream.cfg.iid


class Program:
    """The jitted pieces of a run for one learner, ``ProgramSpec`` and member count."""

    def __init__(self, learner: Learner, spec: ProgramSpec, mesh, members_per_device: int,
                 num_classes: int):
        self.learner, self.spec, self.mesh = learner, spec, mesh
        self.trace_count = 0
        near_future = spec.near_future
        track = spec.blind_window > 0  # the input-blind baseline beside online accuracy
        evaluate = partial(per_task_accuracy, learner, spec.transform, spec.eval_tasks,
                           spec.n_views, spec.n_tasks)
        n_tasks = spec.n_tasks

        def member_chunk(carried, hp, key, aux, idx, fidx, steps, eval_kind, end_step, pools):
            """One member through one chunk. ``carried`` is (learner state, blind baseline
            state, health [2] int32 = (diverged step or -1, cause)); ``counts`` [4] int32
            tallies the hits of online, near-future, blind online and blind near-future
            prediction."""
            self.trace_count += 1  # Python side effect: counts traces, not executions
            train_x, train_y, full, cont = pools
            step_key, eval_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
            n_pool = train_y.shape[0]

            def fetch(idx_s):
                view, sample = idx_s // n_pool, idx_s % n_pool  # virtual index -> view, sample
                return spec.transform(aux, view, train_x[sample]), train_y[sample]

            def correct(logits, labels):
                return (jnp.argmax(logits, -1) == labels).sum()

            def on_fresh(hits, weight):
                """``hits() * weight`` for a 0 / 1 ``weight``; where batches repeat (passes >
                1), ``hits`` (a forward pass) runs only when ``weight`` is 1, not on the
                repeats. A single pass keeps the plain product: no conditional per step."""
                if not spec.repeats:
                    return hits() * weight
                return jax.lax.cond(weight > 0, lambda: hits().astype(jnp.int32),
                                    lambda: jnp.zeros((), jnp.int32))

            def train_step(state, seen, info, idx_s, fidx_s):
                """One valid step: the update, and the step's online tallies."""
                x, y = fetch(idx_s)
                batch = Batch(x, y, task=info.task, boundary=info.boundary, t=info.t,
                              fresh=info.fresh)
                new, metrics = learner.update(state, batch, hp,
                                              jax.random.fold_in(step_key, info.t))
                logits = metrics.get("stream_logits")
                zero = jnp.zeros((), jnp.int32)
                if logits is None:  # a forward in evaluation mode, on fresh steps only
                    online = on_fresh(lambda: correct(learner.predict(state, x, hp), y),
                                      info.fresh)
                else:
                    online = correct(logits, y) * info.fresh
                guess = blind.predict_labels(seen, num_classes, y.shape[0]) if track else None
                hits = [online, zero, (guess == y).sum() * info.fresh if track else zero, zero]
                if near_future:  # the pre-update model on the batch S batches ahead
                    xf, yf = fetch(fidx_s)
                    ahead = (info.future >= 0).astype(jnp.int32)  # fresh steps only
                    hits[1] = on_fresh(lambda: correct(learner.predict(state, xf, hp), yf),
                                       ahead)
                    if track:
                        hits[3] = (guess == yf).sum() * ahead
                if track:
                    seen = blind.observe(seen, y, info.fresh)
                hits = jnp.stack(hits).astype(jnp.int32)
                return new, seen, hits, metrics["loss"].astype(jnp.float32)

            def train_block(start, seen, counts, idx_b, fidx_b, info_b):
                """The block's valid steps, which are a prefix (the schedule pads a block only
                at its end), as a loop of ``valid.sum()`` iterations instead of a scan with a
                ``cond(valid)`` around every step (bit-identical; 6-12% faster for one seed on
                a CPU core, see docs/performance.md)."""
                n_valid = info_b.valid.sum(dtype=jnp.int32)

                def body(c):
                    i, state, seen, counts, loss_sum, bad_t = c
                    info, idx_s, fidx_s = jax.tree.map(lambda a: a[i], (info_b, idx_b, fidx_b))
                    state, seen, hits, loss = train_step(state, seen, info, idx_s, fidx_s)
                    bad_t = jnp.where((bad_t < 0) & ~jnp.isfinite(loss), info.t, bad_t)
                    return i + 1, state, seen, counts + hits, loss_sum + loss, bad_t

                zero, none = jnp.zeros((), jnp.float32), jnp.full((), -1, jnp.int32)
                _, state, seen, counts, loss_sum, bad_t = jax.lax.while_loop(
                    lambda c: c[0] < n_valid, body,
                    (jnp.zeros((), jnp.int32), start, seen, counts, zero, none))
                return state, seen, counts, loss_sum, n_valid, bad_t

            def block(carry, b):
                (start, seen, health), counts = carry
                idx_b, fidx_b, info_b, kind, t_end = b
                state, seen, counts, loss_sum, n, bad_t = train_block(start, seen, counts,
                                                                      idx_b, fidx_b, info_b)
                state, health = isolate_divergence(start, state, health, bad_t, t_end)
                carried = (state, seen, health)
                k = jax.random.fold_in(eval_key, t_end)
                branches = [lambda st: evaluation.zeros(n_tasks),
                            lambda st: evaluate(st, hp, k, aux, full)]
                if cont is None:  # continual evaluations use the task-end pool: one branch
                    kind = jnp.minimum(kind, 1)
                else:
                    branches.insert(1, lambda st: evaluate(st, hp, k, aux, cont))
                acc = jax.lax.switch(kind, branches, carried[0])
                return (carried, counts), (acc, loss_sum / jnp.maximum(n, 1))

            if fidx is None:  # near-future off: a placeholder the steps never read
                fidx = jnp.zeros(idx.shape[:2], jnp.int32)
            (carried, counts), (accs, losses) = jax.lax.scan(
                block, (carried, jnp.zeros((4,), jnp.int32)),
                (idx, fidx, steps, eval_kind, end_step)
            )
            return carried, counts, accs, losses

        member = P(AXIS)
        shared = P()
        # carried, hp, key, aux, idx, fidx are per member; the schedule and pools are shared.
        chunk = over_members(member_chunk, (0, 0, 0, 0, 0, 0, None, None, None, None),
                             members_per_device)
        self.chunk = jax.jit(
            shard_map(
                chunk, mesh=mesh,
                in_specs=(member,) * 6 + (shared,) * 4,
                out_specs=(member, member, member, member),
            ),
            donate_argnums=(0,),
        )

        def member_init(key, hp, example_x):
            return (learner.init(jax.random.fold_in(key, 0), example_x, hp),
                    blind.init_state(max(spec.blind_window, 1)), HEALTHY)

        self.init = jax.jit(shard_map(
            over_members(member_init, (0, 0, None), members_per_device), mesh=mesh,
            in_specs=(member, member, shared), out_specs=member,
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
    cost: bool = False,
    checkpoint: Checkpointer | None = None,
    should_stop: Callable[[], bool] | None = None,
    compile_mode: str = "auto",
) -> RunResult:
    """Train ``len(seeds)`` members through ``stream`` and evaluate them continually:
    ``execute(compile_sweep(...), ...)``.

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

    ``checkpoint``: a ``Checkpointer``; the run resumes from its newest readable checkpoint
    (bit-identical numbers) and saves one at a chunk boundary whenever ``checkpoint.due()``.
    ``should_stop()`` is polled after each chunk; when it returns True the run saves a final
    checkpoint (if it has a checkpointer) and raises ``Interrupted``.

    ``cost=True`` also records compute accounting in ``result.extra["compute"]`` (see
    ``compute_costs``): one extra lowering of a single member's update step (a compilation
    where the backend has no cost analysis of lowered programs).

    ``compile_mode``: ``auto``, ``fast``, ``optimized`` or ``full`` (module docstring); the
    choice made, and the XLA options it gave every program, are in
    ``result.extra["compile"]``.
    """
    sweep = compile_sweep(
        learner, stream, dataset, hparams, seeds, n_devices=n_devices,
        blocks_per_chunk=blocks_per_chunk, eval_batch=eval_batch, precision=precision, log=log,
        memory_limit=memory_limit, cost=cost, compile_mode=compile_mode,
        fresh=checkpoint is None or not checkpoint.exists())
    return execute(sweep, progress=progress, log=log, keep_state=keep_state,
                   checkpoint=checkpoint, should_stop=should_stop)


@dataclass
class Sweep:
    """A sweep compiled and checked against device memory, not started yet: what
    ``compile_sweep`` returns and ``execute`` runs. It holds only the members' hyperparameters,
    keys and stream arguments on the devices; several can be compiled at once, each on its own
    thread (``ocljax.run.experiment`` compiles an experiment's variants that way)."""

    learner: Learner
    stream: Stream
    dataset: Dataset
    seeds: tuple
    precision: str
    program: Program
    mesh: jax.sharding.Mesh
    padded: int  # Mp: members padded to a multiple of the device count
    hp: object  # [Mp] device arrays
    keys: Array
    aux: object
    example_x: Array
    blocks_per_chunk: int
    host_pools: tuple
    abstract: object  # the carried state's shapes and shardings
    chunk: object  # the compiled chunk program
    init: object  # the compiled initialisation (None when resuming)
    eval_chunk: object  # the initial evaluation as a chunk that trains nothing
    plan: MemoryPlan
    eval_batch: int
    options: dict | None  # XLA options of every program of the run
    compile_info: dict  # ``result.extra["compile"]``
    step_flops: float | None  # one member's update FLOPs when ``cost`` was asked for
    cost: bool
    compile_s: float  # wall time of ``compile_sweep``

    @property
    def members(self) -> int:
        return len(self.seeds)

    def put_members(self, tree):
        return put_global(pad_members(tree, self.padded), NamedSharding(self.mesh, P(AXIS)))

    def put_shared(self, tree):
        return put_global(tree, NamedSharding(self.mesh, P()))

    def chunk_args(self, state, chunk, pools):
        """The compiled chunk's arguments for ``chunk`` of the stream."""
        idx = self.put_members(chunk.idx)
        fidx = None if chunk.future_idx is None else self.put_members(chunk.future_idx)
        info = chunk.steps
        if hides_tasks(self.stream):
            info = info._replace(task=np.zeros_like(info.task),
                                 boundary=np.zeros_like(info.boundary))
        steps, kind, end = self.put_shared((info, chunk.eval_kind, chunk.end_step))
        return (state, self.hp, self.keys, self.aux, idx, fidx, steps, kind, end, pools)

    def compile_init(self):
        """The initialisation, compiled here if ``compile_sweep`` did not (it skips it for a
        run that resumes; an unreadable checkpoint starts over)."""
        if self.init is None:
            with precision_lib.matmul_precision(self.precision):
                self.init = self.program.init.lower(self.keys, self.hp,
                                                    self.example_x).compile(self.options)


def compile_sweep(
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
    log: Callable[[str], None] | None = None,
    memory_limit: int | None = None,
    cost: bool = False,
    compile_mode: str = "auto",
    fresh: bool = True,
    compiler: CompileOnce | None = None,
) -> Sweep:
    """Compile a sweep's programs and check its memory plan, allocating nothing but the
    members' hyperparameters and keys (see ``run`` for the arguments; ``fresh=False`` skips
    the initialisation, which a resumed run does not need;
    ``compiler``: a ``CompileOnce`` shared by sweeps that may have programs in common).
    Raises ``ConfigError`` when the sweep does not fit. Safe to call on several threads at
    once: XLA compiles without the GIL, so a many-core host compiles sweeps in parallel."""
    check_compile_mode(compile_mode)
    M = len(seeds)
    if len(hparams) != M or stream.n_members != M:
        raise ConfigError(
            f"{M} seeds, {len(hparams)} hyperparameter sets and a stream for "
            f"{stream.n_members} members: they must match"
        )
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    with precision_lib.matmul_precision(precision):
        # one member's update FLOPs: the compute accounting's, and (CPU) the compile effort's
        # work estimate; the lowered count is cheap on a CPU, elsewhere it needs a compile
        backend = jax.default_backend()
        step_flops = member_step_flops(learner, stream, dataset, hparams[0]) \
            if cost or (backend == "cpu" and compile_mode == "auto") else None
        work = estimated_work(learner, stream, step_flops)
        effort = compile_effort(compile_mode, backend, work)
        options = effort_options(effort)
        if effort == "fast":
            log(f"compiling fast (XLA optimisation off): --compile {compile_mode}"
                + (f", about {work / AUTO_CPU_FLOPS:.1f} s of work per member" if work else ""))
        sweep = _compile(learner, stream, dataset, hparams, tuple(seeds), n_devices,
                         blocks_per_chunk, eval_batch, log, memory_limit, options, fresh,
                         compiler or compile_plain)
    sweep.precision, sweep.step_flops, sweep.cost = precision, step_flops, cost
    sweep.compile_info = {"mode": compile_mode, "effort": effort, "fast": effort == "fast",
                          "options": options, "estimated_work_flops": work}
    sweep.compile_s = time.perf_counter() - t0
    return sweep


def shares_eval_pool(stream: Stream) -> bool:
    """Whether continual evaluations score the same test samples as task-end ones (e.g. both
    all of them, ``eval_per_task=0, test_per_task=0``): the chunk then uploads one test pool
    and holds one evaluation branch, a shorter compile and half the test data in memory."""
    return np.array_equal(stream.eval_continual, stream.eval_full)


def _compile(learner, stream, dataset, hparams, seeds, n_devices, blocks_per_chunk,
             eval_batch, log, memory_limit, options, fresh, compiler) -> Sweep:
    M = len(seeds)
    mesh = local_mesh(n_devices)
    compile_ = partial(compiler, options=options, devices=mesh.devices.flat)
    D = mesh.devices.size
    Mp = -(-M // D) * D
    member_sh, shared_sh = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    put_m = partial(put_global, sharding=member_sh)
    put_s = partial(put_global, sharding=shared_sh)
    chosen = eval_batch  # an explicit evaluation batch is kept; the default may shrink

    key = ("program", learner, program_spec(stream), mesh, Mp // D, dataset.num_classes)
    program = memo(compiler, key, lambda: Program(*key[1:]))
    hp = put_m(pad_members(stack_members(hparams), Mp))
    keys = put_m(pad_members(np.stack([np.asarray(jax.random.PRNGKey(s)) for s in seeds]), Mp))
    aux = put_m(pad_members(stream.aux, Mp))
    example_x = put_s(dataset.train_x[: stream.cfg.batch_size])
    bpc = blocks_per_chunk or default_blocks_per_chunk(stream)
    first = next(stream.chunks(bpc))  # every chunk has this layout; compile against it

    def make_pools(eb):
        """The training pool and test subsets, uploaded once, tests cut in batches of ``eb``.
        When continual evaluations use the same test samples as task-end ones (e.g. both all
        of them), their pool is None: the chunk holds one copy and one evaluation branch."""
        full = make_pool(dataset.test_x[stream.eval_full], dataset.test_y[stream.eval_full], eb)
        cont = None if shares_eval_pool(stream) else make_pool(
            dataset.test_x[stream.eval_continual], dataset.test_y[stream.eval_continual], eb)
        return dataset.train_x, dataset.train_y, full, cont

    sweep = Sweep(learner, stream, dataset, seeds, "float32", program, mesh, Mp, hp, keys, aux,
                  example_x, bpc, (), None, None, None, None, None, 0, None, {}, None, False,
                  0.0)

    # Compile against the abstract state and check the memory plan before allocating. When
    # the default evaluation batch is what does not fit, shrink it (results do not depend on
    # it) before giving up.
    # The initialisation (needed unless the run resumes) compiles on a second thread while
    # this one compiles the chunk: XLA releases the GIL, so on a multi-core host the two
    # compilations overlap. The initial evaluation needs no program of its own: it is the
    # chunk run on blocks that train nothing (``evaluation_chunk``).
    abstract = jax.eval_shape(program.init, keys, hp, example_x)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=member_sh), abstract)
    eval_batch = chosen or default_eval_batch(Mp // D, int(np.prod(dataset.test_x.shape[1:])))

    def lower_chunk(eb):
        host = make_pools(eb)
        abstract_pools = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shared_sh), host)
        lowered = program.chunk.lower(*sweep.chunk_args(abstract, first, abstract_pools))
        return host, abstract_pools, lowered

    host_pools, abstract_pools, lowered = lower_chunk(eval_batch)
    background = ThreadPoolExecutor(1, thread_name_prefix="ocljax-compile") if fresh else None
    init_job = background.submit(compile_, program.init.lower(keys, hp, example_x)) \
        if fresh else None
    try:
        while True:
            compiled = compile_(lowered)
            plan = memory_plan(compiled, abstract, host_pools, Mp, D, memory_limit, mesh)
            log(plan.describe())
            if plan.fits() or chosen or eval_batch <= MIN_EVAL_BATCH:
                break
            eval_batch = max(MIN_EVAL_BATCH, eval_batch // 4)
            log(f"memory: retrying with evaluation batches of {eval_batch} test samples")
            host_pools, abstract_pools, lowered = lower_chunk(eval_batch)
        if os.environ.get("OCLJAX_DUMP_HLO"):  # diagnostics: the optimized chunk program
            dump = Path(os.environ["OCLJAX_DUMP_HLO"])
            dump.mkdir(parents=True, exist_ok=True)
            (dump / f"chunk_m{M}_d{D}.hlo.txt").write_text(compiled.as_text())
        if not plan.fits():
            most = plan.max_members_per_device()
            hb = human_bytes
            room = (f"at most {most * D} member(s) fit on {D} device(s) - run fewer members, "
                    "more devices, or " if most else
                    "not even one member fits (the shared data alone may be too large) - run ")
            raise ConfigError(
                f"this sweep does not fit: {M} member(s) need {hb(plan.per_device)} on each of "
                f"{D} device(s) but a device has {hb(plan.limit)} "
                f"({hb(plan.per_member)} per member, {hb(plan.shared)} shared data); {room}"
                "a smaller model, buffer or evaluation batch"
            )
        if fresh:
            sweep.init = init_job.result()
    finally:  # no compile left queued behind a failure
        if background is not None:
            background.shutdown(wait=False, cancel_futures=True)
    sweep.host_pools, sweep.abstract, sweep.chunk = host_pools, abstract, compiled
    sweep.eval_chunk = evaluation_chunk(first)
    sweep.plan, sweep.eval_batch, sweep.options = plan, eval_batch, options
    return sweep


def execute(
    sweep: Sweep,
    *,
    progress: Callable[[int, int, float], None] | None = None,
    log: Callable[[str], None] | None = None,
    keep_state: bool = False,
    checkpoint: Checkpointer | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """Run a compiled sweep (``compile_sweep``) through its stream: upload the data, initialise
    (or resume from ``checkpoint``), run the chunks and gather the evaluations. See ``run``."""
    log = log or (lambda msg: None)
    stream, program, plan = sweep.stream, sweep.program, sweep.plan
    M, Mp, bpc, keys, hp = sweep.members, sweep.padded, sweep.blocks_per_chunk, \
        sweep.keys, sweep.hp
    t0 = time.perf_counter()
    pools = sweep.put_shared(sweep.host_pools)
    sched = stream.schedule
    layout = {"members": M, "padded_members": Mp, "blocks_per_chunk": bpc,
              "n_blocks": sched.n_blocks, "total_steps": sched.total_steps}
    resumed = None
    if checkpoint is not None:
        resumed = checkpoint.restore(partial(checkpoint_target, sweep.abstract, Mp,
                                             stream.n_tasks, layout))
    if resumed is None:
        sweep.compile_init()
        state = sweep.init(keys, hp, sweep.example_x)
        # the initial evaluation: the chunk program on blocks that train nothing
        state, _, accs, _ = sweep.chunk(*sweep.chunk_args(state, sweep.eval_chunk, pools))
        # sliced on the host: an eager slice of a device array would compile programs of its own
        acc0 = jax.tree.map(lambda a: to_host(a)[:, 0], accs)
        history = History.empty(Mp, stream.n_tasks)._replace(acc0=acc0)
        acc0 = history.acc0
        next_block, run_before = 0, 0.0
    else:
        tree, meta = resumed
        state, history = tree["carried"], History(**tree["history"])
        acc0 = history.acc0
        next_block, run_before = int(meta["next_block"]), float(meta["run_s"])
        log(f"resumed at block {next_block} of {sched.n_blocks} "
            f"(step {int(sched.end_step[min(next_block, sched.n_blocks) - 1])})")
    compile_s = sweep.compile_s + time.perf_counter() - t0

    t1 = time.perf_counter()
    # device outputs of the chunks run since the last sync to the host; their hit counts are
    # summed there too (an eager device-side sum would compile a program of its own)
    pending = []
    for chunk in stream.chunks(bpc, next_block):
        state, correct, accs, losses = sweep.chunk(*sweep.chunk_args(state, chunk, pools))
        pending.append((accs, losses, int(chunk.end_step.max()), correct))
        next_block += bpc
        if progress is not None and len(pending) > 1:
            jax.block_until_ready(pending[-2][0])  # the previous chunk; this one is queued
            progress(pending[-2][2], stream.total_steps, time.perf_counter() - t1)
        stop, due = agree(should_stop is not None and should_stop(),
                          checkpoint is not None and checkpoint.due())
        if checkpoint is not None and (stop or due) and next_block < sched.n_blocks:
            history = history.extend(pending)
            pending = []
            checkpoint.save(next_block, {"carried": state, "history": history._asdict()},
                            {"next_block": next_block, **layout,
                             "run_s": run_before + time.perf_counter() - t1})
        if stop and next_block < sched.n_blocks:
            raise Interrupted(should_stop.signum if hasattr(should_stop, "signum") else 0)
        # a stop asked during the last chunk lets the run finish: its work is all dispatched,
        # and nothing is left to checkpoint (an experiment stops before its next variant)
    jax.block_until_ready(state)
    history = history.extend(pending)
    run_s = run_before + time.perf_counter() - t1
    if progress is not None:
        progress(stream.total_steps, stream.total_steps, run_s)

    nb = history.losses.shape[1]  # whole chunks; the last one padded with no-op blocks
    kind = np.zeros(nb, np.int32)
    kind[: sched.n_blocks] = sched.eval_kind
    keep = kind != 0

    def evals(field):  # [M, E, T]: the initial evaluation, then every evaluated block
        during = np.asarray(getattr(history.accs, field))[:M][:, keep]
        return np.concatenate([np.asarray(getattr(acc0, field))[:M, None], during], axis=1)

    losses = history.losses[:M]
    task = sched.block_task[keep[: sched.n_blocks]]
    steps = sched.end_step[keep[: sched.n_blocks]]
    B = stream.cfg.batch_size
    n_fresh = int(stream.schedule.steps.fresh.sum()) * B
    n_ahead = int((stream.schedule.steps.future >= 0).sum()) * B
    counts = history.counts[:M].astype(np.float64)  # [M, 4], see member_chunk
    nan = np.full(M, np.nan)
    blind_on = stream.cfg.blind_window > 0
    result = RunResult(
        acc=evals("acc"),
        task_aware=evals("task_aware"),
        cumulative=evals("cumulative"),
        near_future_accuracy=counts[:, 1] / n_ahead if n_ahead else nan,
        blind_online_accuracy=counts[:, 2] / max(n_fresh, 1) if blind_on else nan,
        blind_near_future_accuracy=counts[:, 3] / n_ahead if n_ahead and blind_on else nan,
        eval_step=np.concatenate([[0], steps]).astype(np.int64),
        eval_kind=np.concatenate([[EVAL_TASK_END], kind[keep]]).astype(np.int32),
        eval_task=np.concatenate([[-1], task]).astype(np.int32),
        online_accuracy=counts[:, 0] / max(n_fresh, 1),
        block_loss=losses[:, : stream.schedule.n_blocks],
        total_steps=stream.total_steps,
        batch_size=stream.cfg.batch_size,
        compile_s=compile_s,
        run_s=run_s,
        trace_count=program.trace_count,
        final_state=jax.tree.map(lambda a: a[:M], state[0]) if keep_state else None,
        diverged_step=to_host(state[2])[:M, 0].astype(np.int64),
        diverged_cause=to_host(state[2])[:M, 1].astype(np.int64),
        extra={"memory": dataclasses.asdict(plan) | {"per_member": plan.per_member},
               "eval_batch": sweep.eval_batch, "padded_members": Mp,
               "compile": sweep.compile_info},
    )
    if sweep.cost:
        result.extra["compute"] = compute_costs(stream, sweep.step_flops, result)
    return result


def xla_flops(program) -> float | None:
    """FLOPs of a lowered or compiled program by XLA's cost analysis (None where the backend
    has none)."""
    try:
        analysis = program.cost_analysis()
    except Exception:  # noqa: BLE001 - backends without cost analysis
        return None
    if isinstance(analysis, list | tuple):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def update_flops(learner: Learner, example_x, hp) -> float | None:
    """FLOPs of one ``learner.update`` of one member on a batch shaped like ``example_x``,
    from XLA's cost analysis of the lowered step (it is not compiled). XLA counts each
    instruction once: both branches of a ``lax.cond`` are counted and a loop body once, so for
    learners with conditional or looped work (e.g. GDumb's retraining, which runs in
    ``prepare_eval`` and is not counted here) this is an estimate of the per-step work, not a
    measurement."""
    # shapes only: nothing is computed (an eager PRNGKey would compile a program of its own)
    key = jax.eval_shape(jax.random.PRNGKey, 0)
    state = jax.eval_shape(learner.init, key, example_x, hp)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    batch = Batch(
        x=jax.ShapeDtypeStruct(example_x.shape, example_x.dtype),
        y=jax.ShapeDtypeStruct(example_x.shape[:1], jnp.int32), task=scalar,
        boundary=jax.ShapeDtypeStruct((), jnp.bool_), t=scalar,
        fresh=jax.ShapeDtypeStruct((), jnp.bool_),
    )
    # the lowered (unoptimised) program's analysis: within 1% of the compiled one's for the
    # matmul-bound updates, and it costs ~0.1 s where compiling the update cost 1-40 s
    # (MIR, SCR) per variant; it counts what XLA would eliminate as dead (GDumb's 1 MFLOP)
    lowered = jax.jit(learner.update).lower(state, batch, hp, key)
    flops = xla_flops(lowered)  # None where the backend (PJRT C API: GPU, TPU) lacks it
    return flops if flops is not None else xla_flops(lowered.compile())


def member_step_flops(learner: Learner, stream: Stream, dataset: Dataset, hp) -> float | None:
    """``update_flops`` of one member's step on ``stream``'s (transformed) batches."""
    x = dataset.train_x[: stream.cfg.batch_size]
    # the first member's aux is an argument, not a closure: closed-over host arrays indexed by
    # a tracer (a permuted stream's permutations) fail
    aux0 = jax.tree.map(lambda leaf: leaf[0], stream.aux)
    x = jax.eval_shape(lambda aux, a: stream.transform(
        aux, jnp.zeros(a.shape[:1], jnp.int32), a), aux0, x)
    hp = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), jnp.float32), hp)
    return update_flops(learner, x, hp)


def compute_costs(stream: Stream, flops: float | None, result) -> dict:
    """Compute accounting of a run, per member (as argued by Harun et al. 2023, "How Efficient
    Are Today's Continual Learning Algorithms?", and Prabhu et al. 2023, "Computationally
    Budgeted Continual Learning: What Does Matter?", Sec. 3, which compare methods at equal
    compute):

    flops_per_step: ``flops``, XLA's count for one update step (``member_step_flops``);
    flops_per_sample: training FLOPs per incoming stream sample (passes included);
    steps_per_sample: optimizer steps per incoming sample (``passes / batch_size``);
    wall_s_per_member: the run's wall time (without compilation) divided by its members - the
        amortised cost in a vmapped sweep, not a single run's time;
    memory_per_member_bytes: the memory plan's bytes per member (``MemoryPlan.per_member``).
    """
    steps = int(stream.schedule.steps.valid.sum())
    samples = int(stream.schedule.steps.fresh.sum()) * stream.cfg.batch_size
    return {
        "flops_per_step": flops,
        "flops_per_sample": None if flops is None else flops * steps / max(samples, 1),
        "steps_per_sample": steps / max(samples, 1),
        "wall_s_per_member": result.run_s / max(result.n_members, 1),
        "memory_per_member_bytes": result.extra["memory"]["per_member"],
    }


class History(NamedTuple):
    """Host copy of what a run has measured so far (checkpointed with the state)."""

    acc0: evaluation.Accuracies  # leaves [Mp, T], the evaluation before training
    accs: evaluation.Accuracies  # leaves [Mp, blocks so far, T]
    losses: np.ndarray  # [Mp, blocks so far] float32
    counts: np.ndarray  # [Mp, 4] int32 online / near-future / blind hit counters

    @staticmethod
    def empty(Mp: int, T: int, acc0=None) -> History:
        z = np.zeros((Mp, 0, T), np.float32)
        return History(acc0, evaluation.Accuracies(z, z, z), np.zeros((Mp, 0), np.float32),
                       np.zeros((Mp, 4), np.int32))

    def extend(self, pending: list) -> History:
        """Append the device outputs of chunks, ``[(accs, losses, end_step, counts)]``,
        fetched to the host; their hit counts are added to ``counts``."""
        if not pending:
            return self
        accs = evaluation.Accuracies(*(
            np.concatenate([np.asarray(getattr(self.accs, f))]
                           + [to_host(getattr(p[0], f)) for p in pending], axis=1)
            for f in evaluation.Accuracies._fields))
        losses = np.concatenate([self.losses] + [to_host(p[1]) for p in pending], axis=1)
        counts = np.asarray(self.counts, np.int64) + sum(
            to_host(p[3]).astype(np.int64) for p in pending)
        return History(self.acc0, accs, losses, counts.astype(np.int32))


def checkpoint_target(abstract_carried, Mp: int, T: int, layout: dict, meta: dict) -> dict:
    """The tree a checkpoint with ``meta`` restores into; ``ConfigError`` when it was written
    by a run with another layout (members, devices, chunking or stream)."""
    saved = {k: meta.get(k) for k in layout}
    if saved != layout:
        raise ConfigError(f"the checkpoint was written by a run laid out as {saved}, this run "
                          f"is {layout}: resume with the same settings and device count")
    nb = int(meta["next_block"])
    f32 = np.float32
    acc = evaluation.Accuracies(*(np.zeros((Mp, nb, T), f32),) * 3)
    acc0 = evaluation.Accuracies(*(np.zeros((Mp, T), f32),) * 3)
    history = History(acc0, acc, np.zeros((Mp, nb), f32), np.zeros((Mp, 4), np.int32))
    return {"carried": abstract_carried, "history": history._asdict()}


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


__all__ = ["EVAL_CONTINUAL", "EVAL_TASK_END", "MemoryPlan", "Program", "RunResult", "Sweep",
           "compile_sweep", "execute", "local_mesh", "run"]
