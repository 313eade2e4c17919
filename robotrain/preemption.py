"""Preemption: SIGTERM or SIGUSR2 asks the run to stop at the next step boundary.

Schedulers warn before they kill (SLURM sends SIGUSR2 ahead of the time limit when asked,
and SIGTERM on preemption; HF Jobs and Kubernetes send SIGTERM). The handler only sets a
flag: the loop finishes the step it is in, saves a checkpoint and exits with
`EXIT_PREEMPTED`, so that a requeued run continues with `resume=auto`.
"""

from __future__ import annotations

import signal
import threading

#: Exit status of a run stopped by a preemption signal after saving (EX_TEMPFAIL: retry).
EXIT_PREEMPTED = 75

#: What schedulers send ahead of a kill; processes that pass signals on forward these too.
SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class PreemptionFlag:
    """Context manager that turns SIGTERM/SIGUSR2 into `self.signal_name`."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionFlag":
        # Handlers can only be installed from the main thread (e.g. not under a thread-based launcher).
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
