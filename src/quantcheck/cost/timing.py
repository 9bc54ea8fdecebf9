"""One clock for everything that times: on CUDA it synchronizes before every read.

Kernels launch asynchronously, so reading the host clock without synchronizing measures the launch,
not the work (one of the original experiment's defects).
"""

from __future__ import annotations

import time

import torch


class Clock:
    """A monotonic clock that waits for the device to finish queued work before each read."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self._sync = self.device.type == "cuda"

    def now(self) -> float:
        """Seconds on a monotonic clock, read after all queued device work has finished."""
        if self._sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def since(self, start: float) -> float:
        """Seconds elapsed since `start` (a value returned by `now`)."""
        return self.now() - start
