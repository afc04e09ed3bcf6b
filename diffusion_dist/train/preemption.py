"""Preemption: signals set a flag; all ranks agree on it at a step boundary, save and exit to be requeued."""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import cpu_group, distributed

# Exit code after a preemption save: "requeue me" to slurm/train.sh and launch.submit (EX_TEMPFAIL).
REQUEUE_EXIT_CODE = 75


class PreemptionFlag:
    """Signals only set a flag; the loop saves and exits at a step boundary, on all ranks together.

    `received` (names, for the whole process) lets a launcher tell a time-limit warning it should
    requeue after (launch.submit: SIGUSR2) from a cancellation (SIGTERM).
    """

    received: set[str] = set()

    def __init__(self, names: list[str]) -> None:
        self.raised = False
        self._pending: tuple[Any, torch.Tensor] | None = None
        for name in names:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True
        PreemptionFlag.received.add(signal.Signals(signum).name)

    def agreed(self) -> bool:
        """True on every rank, at the same call, once any rank was signalled (a collective).

        Each call returns the verdict of the previous call's all-reduce, which ran in the
        background on a CPU (gloo) group: asking every step never waits for the GPU to drain its
        queue nor for the network. A signal is acted on one or two steps after it came.
        """
        if not distributed():
            return self.raised
        verdict = self._collect()
        flag = torch.tensor([1.0 if self.raised else 0.0])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=cpu_group(), async_op=True)
        self._pending = work, flag
        return verdict

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        work.wait()
        self._pending = None
        return bool(flag.item())

    def close(self) -> None:
        """Wait for the last all-reduce, so no rank leaves one in flight."""
        self._collect()
