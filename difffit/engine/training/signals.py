"""Stopping a run cleanly: Ctrl-C and SIGTERM finish the step, save a checkpoint and return."""

from __future__ import annotations

import signal
import threading

from difffit.engine.progress import say


class StopFlag:
    """Ctrl-C or SIGTERM (Slurm, Kubernetes, `docker stop`) asks the loop to stop after the current step,
    save a checkpoint and return; a second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: str | None = None  # the name of the first stop signal received
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or signal.Signals(signum).name
        say(
            (
                f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                "(Ctrl-C again: abort, no save).",
                "yellow",
            )
        )

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
