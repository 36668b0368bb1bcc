"""Progress lines for long runs, printed between chunks (never from inside the compiled scan)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time


class Progress:
    """Callable ``(steps_done, total_steps, elapsed_s)`` that prints steps, seed-samples/s and
    the ETA at most every ``interval`` seconds (and always at the end)."""

    def __init__(self, label: str, samples_per_step: int, stream=sys.stderr, interval=2.0):
        self.label, self.samples_per_step = label, samples_per_step
        self.stream, self.interval = stream, interval
        self.last = -float("inf")

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.interval:
            return
        self.last = now
        rate = done * self.samples_per_step / max(elapsed, 1e-9)
        eta = (total - done) * elapsed / max(done, 1)
        print(
            f"  [{self.label}] step {done}/{total} ({100 * done / max(total, 1):.0f}%)  "
            f"{rate / 1e3:.1f}k seed-samples/s  ETA {eta:.0f}s",
            file=self.stream, flush=True,
        )


class CompileClock:
    """Tallies JAX's compilation phases in this process while started: tracing Python to
    jaxprs, lowering them to StableHLO, and XLA compiling that to executables, from
    ``jax.monitoring``'s duration events, on every thread (an experiment compiles its variants
    on several). Times are summed over threads, so they can add up to more than the wall
    time they took (and tracing on two threads at once, which share the GIL, counts twice).
    An XLA compile the persistent compilation cache answers is a load: counted as a compile,
    with its (short) time, and in ``cache_hits``."""

    PHASES = {"/jax/core/compile/jaxpr_trace_duration": "trace",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
              "/jax/core/compile/backend_compile_duration": "xla"}

    def __init__(self):
        self.seconds = dict.fromkeys(("trace", "lower", "xla"), 0.0)
        self.counts = dict.fromkeys(("trace", "lower", "xla"), 0)
        self.cache_hits = 0
        self._lock = threading.Lock()
        self._on = False

    def _count(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits" and self._on:
            with self._lock:
                self.cache_hits += 1

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        phase = self.PHASES.get(event)
        if phase is not None and self._on:
            with self._lock:
                self.seconds[phase] += duration
                self.counts[phase] += 1

    def start(self) -> CompileClock:
        """Start tallying (returns self)."""
        from jax import monitoring

        self._on = True
        monitoring.register_event_duration_secs_listener(self._listen)
        monitoring.register_event_listener(self._count)
        return self

    def stop(self) -> None:
        """Stop tallying (the listener is removed where this JAX can remove one)."""
        from jax import monitoring

        if not self._on:
            return
        self._on = False
        for name, listener in (("unregister_event_duration_listener", self._listen),
                               ("unregister_event_listener", self._count)):
            remove = getattr(monitoring, name, None)
            if remove is not None:
                with contextlib.suppress(AssertionError, ValueError):  # already gone
                    remove(listener)

    def summary(self) -> dict:
        """``{"trace_s", "traces", "lower_s", "lowerings", "xla_s", "xla_compiles",
        "cache_hits"}``."""
        s, n = self.seconds, self.counts
        return {"trace_s": s["trace"], "traces": n["trace"], "lower_s": s["lower"],
                "lowerings": n["lower"], "xla_s": s["xla"], "xla_compiles": n["xla"],
                "cache_hits": self.cache_hits}

    def describe(self) -> str:
        """One line: counts and seconds of each phase (``describe_phases``)."""
        return describe_phases(self.summary())


def describe_phases(summary: dict) -> str:
    """A ``CompileClock.summary`` (or a dict holding its keys) in words."""
    t = summary
    hits = f" ({t['cache_hits']} from the cache)" if t["cache_hits"] else ""
    return (f"{t['traces']} traces {t['trace_s']:.1f} s, {t['lowerings']} lowerings "
            f"{t['lower_s']:.1f} s, {t['xla_compiles']} XLA compiles{hits} {t['xla_s']:.1f} s")
