"""A stop request for tests: the training loop is asked to stop at a chosen G step, as a signal would ask it."""

from __future__ import annotations

from sgtrain.stopping import StopRequest


class StopAfter(StopRequest):
    """Asks to stop when the loop checks after G step ``after`` (the loop checks once per step)."""

    def __init__(self, after: int) -> None:
        super().__init__(stop_file="")
        self.after, self.checks = after, 0

    def local(self) -> str | None:
        self.checks += 1
        return "a test request" if self.checks == self.after else None
