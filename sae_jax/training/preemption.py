"""Stopping cleanly on SIGTERM / SIGINT: save at a step boundary that every process agrees on.

One process: the signal sets a flag and the loop saves at the next step boundary. Several
processes (JAX's multi-controller runtime): the checkpoint save is a collective, so every
process must stop after the same step even when the scheduler's signals reach them at
different times. SIGTERM is then left to JAX's preemption service, which agrees on the step
(`multihost_utils.reached_preemption_sync_point`); SIGINT is handed to it as a SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(RuntimeError):
    """A SIGTERM/SIGINT stopped training after saving a checkpoint."""

    def __init__(self, signum: int, step: int, workdir: str | os.PathLike):
        """`workdir`: a local path or a URL, named as it is."""
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: saved a checkpoint at step {step} in {workdir}; "
            "run the same command again to resume"
        )


class PreemptionGuard:
    """Within the block, SIGTERM and SIGINT do not kill the process; `stop_after(step)`,
    called after every step, says when to save and stop. Handlers are restored on exit
    (they are only installed from the main thread)."""

    def __enter__(self) -> PreemptionGuard:
        self.signal: int | None = None
        self._old = {}
        # The service runs unless jax_enable_preemption_service was turned off.
        self._synced = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        if threading.current_thread() is threading.main_thread():
            # With the service, SIGTERM stays with JAX's own handler (its preemption notice).
            mine = (signal.SIGINT,) if self._synced else (signal.SIGTERM, signal.SIGINT)
            for s in mine:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if self._synced:
            signal.raise_signal(signal.SIGTERM)  # a preemption notice for every process

    def stop_after(self, step: int) -> bool:
        """True once a signal came and, with several processes, all of them reached the
        agreed step. With several processes it must be called after every step."""
        if not self._synced:
            return self.signal is not None
        if multihost_utils.reached_preemption_sync_point(step):
            self.signal = self.signal or signal.SIGTERM
            return True
        return False

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
