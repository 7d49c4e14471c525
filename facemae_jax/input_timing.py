"""How much of the training loop's time goes to waiting for the next batch (``perf/input_wait_fraction``).

The train step is dispatched asynchronously, so while the loop blocks in ``next(iterator)`` the accelerator is
still running the previous step. A pipeline that keeps up has the next batch buffered and the wait is ~0; one that
does not makes the loop wait for roughly the time the accelerator sits idle. So the fraction of a logging window
spent inside ``next()`` is a direct, cheap starvation measure (no profiler, no device synchronisation).

The first batch of a run (worker start-up, not steady state) is not counted.
"""

from __future__ import annotations

import time
from typing import Iterator

WARN_ABOVE = 0.10


class InputWaitMeter:
    """Wraps ``next(iterator)``; ``window()`` returns the wait fraction since the previous call and resets."""

    def __init__(self, warn_above: float = WARN_ABOVE, clock=time.perf_counter):
        self.warn_above = warn_above
        self._clock = clock
        self._waited = 0.0
        self._window_start = clock()
        self._first = True
        self.warned = False

    def next(self, iterator: Iterator):
        start = self._clock()
        batch = next(iterator)
        if self._first:  # start-up: workers spawning, first reads; the window starts now
            self._first = False
            self._window_start = self._clock()
        else:
            self._waited += self._clock() - start
        return batch

    def window(self) -> float:
        now = self._clock()
        elapsed = now - self._window_start
        fraction = self._waited / elapsed if elapsed > 0 else 0.0
        self._waited, self._window_start = 0.0, now
        return fraction

    def warning(self, fraction: float, step: int, hint: str = "") -> str | None:
        """The one-time warning line when ``fraction`` exceeds the threshold, else None."""
        if self.warned or fraction <= self.warn_above:
            return None
        self.warned = True
        return (f"[input] up to step {step} the training loop waited for input {100 * fraction:.0f}% of the time "
                f"(> {100 * self.warn_above:.0f}%): the input pipeline is the bottleneck. {hint}".rstrip())


HINT = ("What helps: more worker processes (data.worker_count; -1 = every spare core), RandAugment on device "
        "(data.rand_augment_on='device') when fine-tuning, frames stored at the model's input size; README 'Input "
        "pipeline throughput' lists the per-core costs.")
