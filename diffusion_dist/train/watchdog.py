"""One failing rank ends the job: every rank stops within seconds, with the failing rank's error in the log.

Without this, a rank that raises (disk full while saving, a data error, an out-of-memory) or dies
leaves the others blocked in their next collective until the launcher ends them or the collective
times out (run.collective_timeout_s). With more than one rank, every rank runs a `Watchdog`: a
daemon thread that once a second all-reduces a tiny status on a gloo group of its own (a process
group is driven from one thread only: the preemption flag has `cpu_group()`). A rank whose training
raises marks itself failed; the next round carries the mark and the ranks' reasons (one line each)
to every rank, whose watchdog logs "rank R failed: <reason>", waits for that rank's process to end
(launchers then name it first: torchrun's "root cause"), and ends its own with PEER_FAILED_EXIT_CODE.
A rank that dies (its connections close) or freezes (no heartbeat within run.heartbeat_timeout_s)
ends the others the same way.

Ending a process whose main thread is blocked in a collective: neither a gloo nor an NCCL call can
be interrupted from another thread, so the watchdog kills this rank's children (data-loader
workers) and calls os._exit. The failing rank itself exits through its main thread, with its
traceback; faulthandler ends it if that exit hangs (EXIT_DEADLINE_S).

Exit codes: the failing rank keeps its own (launch.train: 2 bad data, 1 any other error); the
others exit 1, the lowest failure code, so that srun, which returns its tasks' highest code, reports
the failing rank's code, and a failure is never taken for a preemption (75, requeue).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Exit code of a rank ended because another rank failed: "training failed" (docs/run-directory.md).
PEER_FAILED_EXIT_CODE = 1
HEARTBEAT_INTERVAL_S = 1.0
# How long a failing rank waits for the others to hear of it before it goes on to exit.
NOTICE_WAIT_S = 5.0
# A failing rank that has not ended this long after telling the others (a hang at interpreter exit,
# e.g. in a process group's destructor) is ended by faulthandler, which also prints every thread's stack.
EXIT_DEADLINE_S = 30.0
REASON_BYTES = 1024  # one line of reason per rank, UTF-8, truncated

_running: Watchdog | None = None


class Watchdog:
    """This rank's heartbeat with every other rank; ends this process when another rank fails.

    Making one is a collective (it creates a process group): every rank makes it at the same point,
    right after `init_process_group`. With one rank it does nothing.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        global _running
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self._reason: str | None = None  # set once, by fail()
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._heard = threading.Event()  # the others know of this rank's failure, or cannot be told
        self._ending = threading.Event()  # another rank failed: this process is being ended
        self._thread: threading.Thread | None = None
        if world_size > 1:
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            self._thread = threading.Thread(target=self._run, name="diffusion-dist-watchdog", daemon=True)
            self._thread.start()
        _running = self

    def fail(self, error: BaseException) -> None:
        """Tell the other ranks that this one failed with `error`; return once they know (seconds).

        Then arm a deadline: if this process has not ended EXIT_DEADLINE_S later, it is ended with code 1.
        """
        if self._thread is None or self._reason is not None:
            return
        if self._ending.is_set():
            # Another rank failed or died first, and this error is its echo (a collective lost that
            # rank): the watchdog thread is ending this process.
            self._thread.join()
            return
        self._reason = describe(error)
        self._wake.set()  # the next round now, not after the interval
        self._heard.wait(NOTICE_WAIT_S)
        if self._ending.is_set():  # the heartbeat broke too: the watchdog thread ends this process
            self._thread.join()
            return
        faulthandler.dump_traceback_later(EXIT_DEADLINE_S, exit=True)

    def close(self) -> None:
        """Stop the heartbeat once every rank has closed its watchdog (a collective: at the end, on all ranks)."""
        global _running
        if self._thread is not None:
            self._closing.set()
            self._wake.set()
            self._thread.join()
        if _running is self:
            _running = None

    def _run(self) -> None:
        try:
            failed = self._beat()
        except Exception as e:  # a rank's connection closed (it died), or no heartbeat within the timeout
            if self._closing.is_set():
                self._heard.set()
                return
            # This rank's own error, if it has one, is likely the echo of the same loss: end here too.
            self._ending.set()
            self._heard.set()
            own = f"; this rank had failed too: {self._reason}" if self._reason else ""
            log.error(
                "lost the heartbeat of another rank, which died or froze (%s)%s; ending rank %d with exit code %d",
                _first_line(e),
                own,
                self.rank,
                PEER_FAILED_EXIT_CODE,
            )
            end_process(PEER_FAILED_EXIT_CODE)
        if failed and self.rank not in failed:
            self._ending.set()  # before _heard: a failure of this rank's own now is an echo
        self._heard.set()
        if not self._ending.is_set():
            return  # every rank closed; or this rank failed, and its main thread exits with its error
        reasons = "; ".join(f"rank {r} failed: {why}" for r, why in failed.items())
        log.error("%s; ending rank %d with exit code %d", reasons, self.rank, PEER_FAILED_EXIT_CODE)
        self._await_exit_of_failed_ranks()
        end_process(PEER_FAILED_EXIT_CODE)

    def _beat(self) -> dict[int, str]:
        """Heartbeats until every rank closed ({}) or some rank failed (their reasons, by rank)."""
        while True:
            reason = self._reason
            # [any rank failed, any rank still running]: MAX over ranks.
            status = torch.tensor([reason is not None, not self._closing.is_set()], dtype=torch.int32)
            dist.all_reduce(status, op=dist.ReduceOp.MAX, group=self._group)
            if status[0]:
                return self._exchange_reasons(reason)
            if not status[1]:
                return {}
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _exchange_reasons(self, reason: str | None) -> dict[int, str]:
        """Every failed rank's reason, by rank (an all-gather on the watchdog's group)."""
        mine = torch.zeros(REASON_BYTES, dtype=torch.uint8)
        encoded = (reason or "").encode()[:REASON_BYTES]
        if encoded:
            mine[: len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        pieces = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(pieces, mine, group=self._group)
        texts = {r: bytes(p.tolist()).rstrip(b"\0").decode(errors="replace") for r, p in enumerate(pieces)}
        return {r: text for r, text in texts.items() if text}

    def _await_exit_of_failed_ranks(self) -> None:
        """Wait until the failed ranks have exited (bounded by their exit deadline and the heartbeat timeout),
        so that launchers see them end first: torchrun names the first rank to exit as the root cause."""
        try:
            dist.all_reduce(torch.zeros(1), group=self._group)  # a round the failed ranks never join
        except Exception:
            pass  # their connections closed, or the timeout passed


def fail(error: BaseException) -> None:
    """`Watchdog.fail` on this process's running watchdog; nothing when there is none (one rank, or not started)."""
    if _running is not None:
        _running.fail(error)


def describe(error: BaseException) -> str:
    """One line naming the error, e.g. "OSError: [Errno 28] No space left on device" (the traceback is in the
    failing rank's own log)."""
    return f"{type(error).__name__}: {_first_line(error)}"


def end_process(code: int) -> None:
    """End this process now, from any thread, even while the main thread is blocked in a collective:
    flush the logs, kill the children (data-loader and compile workers: no orphans), then os._exit.
    No atexit handler or destructor runs: none could finish while a collective holds the main thread."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(code)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"
