"""N processes on one node, forked after the imports, as the ranks of one gloo process group.

torchrun starts N fresh interpreters, and each imports torch and megatron-core again: on a 16-core node its
launcher took about 2 s and each rank's imports 2.5 s more, as long as the conversion of a 2 GiB model itself
(RESULTS.md, session 4). Forked ranks start with all of that loaded. Jobs across nodes still use torchrun.
"""
from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist

from .errors import ConversionError
from .runtime import release_own_group
from .stopping import STOP_SIGNALS, Stopped, die_with_parent, install, stopped

# after one rank fails, how long the others get to notice (gloo raises when a peer's socket closes) and clean up
GRACE_S = 30.0
# workers="auto" forks at most this many: on a 16-core node 8 ranks already had the disk as the limit
MAX_AUTO = 8


_rank: int | None = None  # in a forked rank: its number


def forked_rank() -> int | None:
    """This process's rank if run_forked made it, else None."""
    return _rank


def auto_count(out_bytes: int, largest: int) -> int:
    """How many ranks workers="auto" forks: one per 512 MiB to write (a smaller share does not pay for a rank's
    set-up), at most one per core and MAX_AUTO, and no more than the available memory holds at 1 GiB + 2 x the
    largest tensor each (RESULTS.md: a rank's peak is its imports plus about two tensors)."""
    n = min(os.cpu_count() or 1, MAX_AUTO, out_bytes // (512 << 20))
    avail = _available_memory()
    if avail is not None:
        n = min(n, avail // ((1 << 30) + 2 * largest))
    return max(1, n)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_forked(n: int, fn: Callable[[], None]) -> None:
    """Run fn() in n forked ranks; returns once every rank succeeded, else raises the first failure's error.

    A rank that fails makes the others fail at their next collective, so each cleans up after itself; one still
    running GRACE_S later is killed.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise ConversionError("workers: CUDA is initialised in this process, and a forked child cannot use it")
    release_own_group()
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryDirectory(prefix="hf2mcore-workers-") as tmp:
        store = os.path.join(tmp, "store")
        ranks, parent = {}, os.getpid()
        for rank in range(n):
            pid = os.fork()
            if pid == 0:
                _rank_main(rank, n, store, os.path.join(tmp, f"error-{rank}"), fn, parent)
            ranks[pid] = rank
        failed, killed = _wait_all(ranks)
        if failed:
            raise _cause(failed, killed, tmp)


def _cause(failed: dict[int, int], killed: set[int], tmp: str) -> Exception:
    """The error of the rank that failed first: a rank that died by a signal this did not send (the OOM killer,
    a crash), else the earliest error written; the other ranks' collectives failed because that one had left."""
    for rank, code in failed.items():
        if code < 0 and rank not in killed:
            return RuntimeError(f"worker rank {rank} was killed by signal {-code}")
        if code - 128 in STOP_SIGNALS:
            return Stopped(code - 128)
    written = {r: p for r in failed if os.path.exists(p := os.path.join(tmp, f"error-{r}"))}
    if not written:
        return RuntimeError(f"worker ranks {sorted(failed)} failed without a message")
    rank = min(written, key=lambda r: os.stat(written[r]).st_mtime_ns)
    msg = open(written[rank]).read()
    if failed[rank] == 2:
        return ConversionError(msg)
    exc = RuntimeError(f"worker rank {rank} failed: {msg.strip().splitlines()[-1]}")
    exc.add_note(msg)  # its traceback, shown with --debug
    return exc


def _wait_all(ranks: dict[int, int]) -> tuple[dict[int, int], set[int]]:
    """Reap every rank: the exit codes of those that failed, by rank, and the ranks this killed. Polls each of its
    own pids (waitpid(-1) would also reap children that are not ours, which their owners could then not wait for)."""
    failed: dict[int, int] = {}
    killed: set[int] = set()
    interrupted, deadline = None, None
    while ranks:
        try:
            time.sleep(0.05)
        except KeyboardInterrupt as exc:  # SIGINT or SIGTERM (stopping.Stopped): the ranks clean up, then this stops
            interrupted, deadline = exc, deadline or time.monotonic() + GRACE_S
            for pid in ranks:  # a terminal's Ctrl-C reached them too; a SIGTERM sent to this process alone did not
                os.kill(pid, getattr(exc, "signum", signal.SIGINT))
        for pid in list(ranks):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rank, code = ranks.pop(pid), os.waitstatus_to_exitcode(status)
                if code != 0:
                    failed[rank], deadline = code, deadline or time.monotonic() + GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            for pid, rank in ranks.items():
                os.kill(pid, signal.SIGKILL)
                killed.add(rank)
    if interrupted is not None:
        raise interrupted
    return failed, killed


def _rank_main(rank: int, n: int, store: str, error_path: str, fn: Callable[[], None], parent: int) -> None:
    """A child's whole life: join the group, run fn, leave with 0, 2 (ConversionError) or 1, writing why."""
    # The parent's objects are this rank's too: its collector must not free them (a process group freed here
    # would join threads that were never forked).
    gc.freeze()
    global _rank
    _rank = rank
    code = 1
    try:
        die_with_parent(parent)
        install()
        # the ranks are the parallelism; and OpenMP's pool, if the parent used one, does not survive a fork
        torch.set_num_threads(1)
        dist.init_process_group("gloo", store=dist.FileStore(store, n), rank=rank, world_size=n)
        fn()
        code = 0
    except ConversionError as exc:
        code = 2
        _write(error_path, str(exc))
    except BaseException as exc:
        stop = stopped(exc)
        if stop:  # its cleanup ran; the parent reports the signal
            code = stop.exit_code
        else:  # the parent shows it if this rank failed first; later ones follow from it
            _write(error_path, traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if os.getppid() != parent:  # the parent was killed outright and left the ranks' directory (the store, the
            shutil.rmtree(os.path.dirname(store), ignore_errors=True)  # errors): its ranks remove it as they go
        os._exit(code)  # not the parent's atexit handlers, nor its interpreter teardown


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
