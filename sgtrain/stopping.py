"""How a run ends early: on request (SIGUSR1, SIGTERM or a stop file: it finishes its step, checkpoints and exits
75), or on non-finite values it cannot get past (:class:`NonFiniteError`, exit 4).

Slurm sends SIGUSR1 (``--signal=B:USR1@120`` in ``slurm/biggan.sh``) or SIGTERM (preemption, the time limit) some
time before it kills a job; a cluster scheduler, ``kill`` or a wrapper script may also create the file named by
``$SGTRAIN_STOP_FILE``, which reaches the ranks on the batch node when a signal cannot (``accelerate launch`` does not
forward SIGUSR1 to its workers). Any one rank seeing a request is enough: the ranks combine their flags once per step
(:meth:`StopRequest.agreed`) so that all of them stop after the same step and write one checkpoint together.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from sgtrain.comm import Comm

# Exit codes of `python -m sgtrain` (all of them here, so that launchers and the CLI read one table).
EXIT_BAD_INPUT = 2  # bad config, paths, shards, checkpoints or launch; before any work where possible
EXIT_DIVERGED = 3  # the ranks' masks diverged: the run stops before checkpointing the forked state
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; the same command resumes the run
STOP_FILE_ENV = "SGTRAIN_STOP_FILE"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StoppedEarly(Exception):
    """The run stopped on request after writing the checkpoint of ``step``; running it again resumes there."""

    def __init__(self, step: int, steps: int, reason: str) -> None:
        super().__init__(
            f"stopped by {reason} after step {step} of {steps}; its checkpoint is written, and running the same "
            f"command again resumes from it"
        )
        self.step, self.steps, self.reason = step, steps, reason


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """For data-loader workers: a signal sent to the whole process group (Slurm, a terminal) must not kill them
    mid-step; the main process finishes the step and shuts them down itself."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopRequest:
    """Catches SIGUSR1 / SIGTERM while installed (a context manager) and watches ``$SGTRAIN_STOP_FILE``."""

    def __init__(self, stop_file: str | Path | None = None) -> None:
        path = stop_file if stop_file is not None else os.environ.get(STOP_FILE_ENV)
        self.stop_file = Path(path) if path else None
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Only a flag: the step in flight (and any collective it is in) completes normally.
        self.reason = self.reason or signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a test harness): requests come by file only
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def local(self) -> str | None:
        """This process's reason to stop, if any."""
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"the stop file {self.stop_file}"
        return self.reason

    def agreed(self, comm: Comm) -> str | None:
        """Whether any rank was asked to stop (every rank gets the same answer): one tiny all-reduce per call."""
        reason = self.local()
        flag = torch.tensor([1 if reason else 0], dtype=torch.int64)
        if int(comm.all_reduce(flag, "max")) == 0:
            return None
        return reason or "a request to another rank"


EXIT_NONFINITE = 4  # a NaN or Inf that skipping or rolling back could not get past (train.nonfinite, max_nonfinite)


class NonFiniteError(RuntimeError):
    """A NaN or Inf in a loss, a gradient or a state about to be checkpointed, found on some rank before it was
    applied or written. ``rollback``: the run restarts from its latest checkpoint; otherwise it stops (exit 4).
    ``events`` counts non-finite events of this process so far."""

    def __init__(self, message: str, *, step: int, events: int, rollback: bool) -> None:
        super().__init__(message)
        self.step, self.events, self.rollback = step, events, rollback
