"""Test-only fault hooks: a request can ask its shard to fail in a chosen way.

They exist so that the reliability tests can prove how a failure is contained, with the real processes.
A shard honours them only when started with ``--fault-injection`` (the launcher's flag, off by default, read
from the command line only: no environment variable turns it on); otherwise the ``fault`` field of a request
is ignored.

- ``nan``: the request's logits turn NaN at its first decode step: a per-request failure that must end
  that request alone and leave its batch-mates untouched.
- ``step``: the step that runs the request raises: a whole-step failure the shard recovers from
  (the router fails that step's requests with 424 and clears the batch).
- ``fatal``: the step raises an unrecoverable device error: the shard exits non-zero and the launcher
  takes the server down.
- ``sleep``: every step that runs the request holds the worker ``SLEEP_S`` seconds longer (a stand-in
  for a long prefill, or a slow device).
"""

from __future__ import annotations

import time

import torch

from common.faults import FAULTS

from .types import RequestSpec

__all__ = ["FAULTS", "Faults", "is_fatal"]
SLEEP_S = 0.25


class InjectedStepError(RuntimeError):
    """A recoverable whole-step failure, asked for by a request."""


class FatalDeviceError(RuntimeError):
    """An error after which the device (and so the shard) cannot be trusted: the shard must exit."""


def is_fatal(error: BaseException) -> bool:
    """Whether a step failure leaves the device unusable (a CUDA error, an illegal memory access...).

    Out-of-memory is not fatal: the step's memory is freed and the next step can run."""
    if isinstance(error, FatalDeviceError):
        return True
    if isinstance(error, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("CUDA error" in message or "device-side assert" in message)


class Faults:
    """The hooks of one shard; every method is a no-op for requests that ask for nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def before_step(self, requests: list[RequestSpec]) -> None:
        """Raises or sleeps for the requests of this step that ask for it."""
        if not self.enabled:
            return
        faults = {r.fault for r in requests}
        if "sleep" in faults:
            time.sleep(SLEEP_S)
        if "fatal" in faults:
            raise FatalDeviceError("injected fault: unrecoverable device error")
        if "step" in faults:
            raise InjectedStepError("injected fault: the step failed")

    def poison(self, requests: list[RequestSpec], logits: torch.Tensor) -> torch.Tensor:
        """NaN logits for the rows that ask for it."""
        if not self.enabled:
            return logits
        rows = [row for row, r in enumerate(requests) if r.fault == "nan"]
        if not rows:
            return logits
        logits = logits.clone()
        logits[rows] = float("nan")
        return logits
