"""SIGTERM and SIGINT become an exception, so every cleanup (the temporary output above all) runs before exit.

SIGTERM is what `timeout`, Slurm and Kubernetes send; by default it ends the process on the spot and leaves a
half-written temporary directory behind. Each handler fires once: a second signal during the cleanup is ignored
rather than cutting the cleanup short.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (a KeyboardInterrupt, so code that handles Ctrl-C handles this too)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:  # the shell's convention: 128 + the signal's number (130 for INT, 143 for TERM)
        return 128 + self.signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


_RECEIVED: list[int] = []
_LOST_IN: set = set()  # code of functions whose exceptions Python drops (gc callbacks): a signal there comes again


def exceptions_lost(fn):
    """Mark `fn` as code whose exceptions are dropped (a gc callback: Python prints and ignores what it raises)."""
    _LOST_IN.add(fn.__code__)
    return fn


def _raise(signum, frame):
    if frame is not None and frame.f_code in _LOST_IN:  # raised there, the stop would be printed and forgotten
        threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
        return
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    _RECEIVED.append(signum)
    raise Stopped(signum)


def stopped(exc: BaseException) -> Stopped | None:
    """The Stopped behind exc: exc itself, or the signal received while C++ code (torch's file writer) turned the
    handler's exception into one of its own."""
    if isinstance(exc, Stopped):
        return exc
    return Stopped(_RECEIVED[0]) if _RECEIVED else None


def install() -> None:
    """Turn STOP_SIGNALS into Stopped in this process (the CLI and forked ranks; a library caller keeps its own)."""
    for s in STOP_SIGNALS:
        signal.signal(s, _raise)


def die_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when `parent` ends, however it ends (SIGKILL included): a forked
    rank must never outlive, and then publish for, a caller that was already told the run failed."""
    pr_set_pdeathsig = 1
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # Linux; elsewhere the parent's wait must do
    if prctl is not None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # it ended before the request was in place
        raise Stopped(signal.SIGTERM)
