"""Progress lines for long runs, printed between chunks (never from inside the compiled scan)."""

from __future__ import annotations

import sys
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
