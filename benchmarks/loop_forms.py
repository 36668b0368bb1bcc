"""One seed's online pass written three ways, measured in the same process: which loop form
should the driver use for few members on each backend?

    python -m benchmarks.loop_forms [--quick] [--json PATH]

Workload: one seed of online ER (``ocljax.learners.er``, reservoir of 1,000 rows, 10 incoming
+ 10 replayed rows, MLP 784-256-256-10, SGD lr 0.1) over random MNIST-shaped data, in blocks
of 100 steps whose last block is padded (its valid steps are a prefix, as in the driver's
schedule). 6,000 steps (1,200 with ``--quick``), three alternating rounds, best of each.

- ``while``: per block, a ``while_loop`` of ``valid.sum()`` iterations (the driver's form
  since the eighth round; a data-dependent trip count);
- ``scan+cond``: per block, a ``scan`` over all its steps with ``lax.cond(valid)`` around
  each (the driver's earlier form);
- ``scan+mask``: per block, a ``scan`` whose every step runs the update and keeps it with
  ``jnp.where(valid, new, old)``: no control flow inside the loop at all.

On a CPU they differ by a few percent. On a GPU, XLA reads a data-dependent loop predicate
and a ``cond``'s branch index back to the host at every step, while a scan with a static trip
count and no branch needs no such round trip, which matters when one seed's step is a few
dozen microseconds of kernels.

On a GPU (or with ``--graphs``) a fourth form, ``while+graphs``, is the ``while`` form compiled
with XLA's command buffers (CUDA graphs) enabled for every kind of command, loops and
conditionals included (``GRAPH_OPTIONS``): the loop's predicate is then evaluated on the device
inside one graph launch instead of on the host between kernel launches. Whether this XLA
already does so by default is what the comparison with ``while`` shows. A CPU ignores the
option (the form then times the ``while`` program again); an XLA that does not know it skips
the form with a note.

Prints ms per step and the ratios against ``while``; checks that the forms end in the same
state (equal up to float32 rounding) and writes JSON.
"""

from __future__ import annotations

import sys
import time

BLOCK = 100
# XLA:GPU command buffers for every command kind, WHILE and CONDITIONAL included
GRAPH_OPTIONS = {"xla_gpu_enable_command_buffer":
                 "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"}


def build(form: str, learner, hp, blocks: int):
    """``run(state, xs [S, B, ...], ys [S, B], valid [S]) -> state`` over ``blocks`` blocks of
    ``BLOCK`` steps in loop form ``form``."""
    import jax
    import jax.numpy as jnp

    from ocljax.types import Batch

    def step(state, t, x, y):
        batch = Batch(x, y, task=jnp.zeros((), jnp.int32), boundary=jnp.zeros((), bool), t=t,
                      fresh=jnp.ones((), bool))
        return learner.update(state, batch, hp, jax.random.fold_in(jax.random.key(0), t))[0]

    def block(state, b):
        t0, x_b, y_b, valid_b = b
        if form == "while":
            n = valid_b.sum(dtype=jnp.int32)

            def body(c):
                i, s = c
                return i + 1, step(s, t0 + i, x_b[i], y_b[i])

            return jax.lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(0), state))[1], None

        def scan_step(s, a):
            i, x, y, v = a
            if form == "scan+cond":
                return jax.lax.cond(v, lambda s: step(s, t0 + i, x, y), lambda s: s, s), None
            new = step(s, t0 + i, x, y)
            return jax.tree.map(lambda n_, o: jnp.where(v, n_, o), new, s), None

        return jax.lax.scan(scan_step, state, (jnp.arange(BLOCK), x_b, y_b, valid_b))[0], None

    def run(state, xs, ys, valid):
        shape = (blocks, BLOCK)
        bx = xs.reshape(shape + xs.shape[1:])
        by = ys.reshape(shape + ys.shape[1:])
        t0 = jnp.arange(blocks, dtype=jnp.int32) * BLOCK
        return jax.lax.scan(block, state, (t0, bx, by, valid.reshape(shape)))[0]

    return jax.jit(run)


def main(argv=None) -> int:
    from benchmarks import quick_parser, write_json

    p = quick_parser("benchmarks.loop_forms", __doc__, "1,200 steps")
    p.add_argument("--graphs", action="store_true",
                   help="time the while+graphs form off a GPU too (default: on GPUs only)")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from ocljax import models
    from ocljax.learners import er

    steps = 1200 if args.quick else 6000
    valid_steps = steps - BLOCK // 2  # the last block is half padding
    blocks = steps // BLOCK
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 256, (steps, 10, 28, 28, 1), dtype=np.uint8)
    ys = rng.integers(0, 10, (steps, 10)).astype(np.int32)
    valid = np.arange(steps) < valid_steps
    model = models.make_model("mlp", 10)
    learner = er.make(model, er.Config(buffer_size=1000))
    hp = er.HParams(lr=0.1)
    state0 = learner.init(jax.random.key(1), xs[0], hp)
    backend = jax.default_backend()
    forms = ["while", "scan+cond", "scan+mask"]
    if backend == "gpu" or args.graphs:
        forms.append("while+graphs")
    compiled = {}
    for form in list(forms):
        t0 = time.perf_counter()
        lowered = build(form.split("+graphs")[0], learner, hp, blocks).lower(state0, xs, ys,
                                                                             valid)
        try:
            compiled[form] = lowered.compile(GRAPH_OPTIONS if form.endswith("+graphs") else None)
        except jax.errors.JaxRuntimeError as err:
            if not form.endswith("+graphs"):
                raise
            print(f"{form:12s} skipped: this XLA refused {GRAPH_OPTIONS} ({err})", flush=True)
            forms.remove(form)
            continue
        print(f"{form:12s} compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    times, finals = {f: [] for f in forms}, {}
    args_ = [jax.device_put(a) for a in (xs, ys, valid)]
    for _ in range(3):
        for form in forms:
            jax.block_until_ready(compiled[form](state0, *args_))
            t0 = time.perf_counter()
            finals[form] = jax.block_until_ready(compiled[form](state0, *args_))
            times[form].append((time.perf_counter() - t0) / valid_steps * 1e3)
    best = {f: min(ts) for f, ts in times.items()}
    diffs = {}
    for form in forms[1:]:
        pairs = zip(jax.tree.leaves(finals[form]), jax.tree.leaves(finals["while"]), strict=True)
        diffs[form] = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                                .max()) for a, b in pairs)
    for form in forms:
        ratio = best["while"] / best[form]
        print(f"{form:12s} {best[form]:.4f} ms/step  {1e4 / best[form] / 1e3:7.1f} k samples/s  "
              f"{ratio:.2f}x while  (runs: " + ", ".join(f"{t:.4f}" for t in times[form]) + ")"
              + (f"  max |state - while| {diffs[form]:.1e}" if form in diffs else ""))
    write_json(args.json, {
        "benchmark": "loop_forms", "backend": backend,
        "device": str(jax.devices()[0]), "steps": steps, "valid_steps": valid_steps,
        "block": BLOCK, "ms_per_step": times, "best_ms_per_step": best,
        "while_over_form": {f: best["while"] / best[f] for f in forms},
        "max_state_difference_vs_while": diffs,
        "graph_options": GRAPH_OPTIONS if "while+graphs" in forms else None,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
