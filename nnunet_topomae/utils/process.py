"""Worker processes that end with the training process.

nnU-Net's forked data-loading workers outlive a training process killed with ``kill -9`` (or by the
OOM killer) for minutes, holding memory and the job's output streams. A worker that calls
``die_with_parent`` once gets SIGKILL from the kernel the moment its parent dies (Linux
``PR_SET_PDEATHSIG``); elsewhere it is a no-op.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_armed_in_pid = None


def die_with_parent(expected_parent: int | None = None) -> bool:
    """Ask the kernel to kill this process when its parent dies; once per process. If the parent is
    already gone (``expected_parent`` given and no longer our parent), exit now. Returns whether the
    kernel took the request."""
    global _armed_in_pid
    if _armed_in_pid == os.getpid():
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    _armed_in_pid = os.getpid()
    # the parent may have died between fork and prctl: then nobody would send the signal
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)
    return ok


_fork_hooks_registered = False
_forking_from_main_thread = False


def _before_fork() -> None:
    global _forking_from_main_thread
    import threading
    _forking_from_main_thread = threading.current_thread() is threading.main_thread()


def children_die_with_this_process() -> None:
    """From now on, every process forked from this one's main thread (nnU-Net's data-loading workers
    are) calls ``die_with_parent`` first. Forks from other threads are left alone: the kernel sends the
    signal when the forking *thread* ends, which would kill such a child early. Spawned processes
    (the persistence pool) do not fork Python and watch their parent themselves."""
    global _fork_hooks_registered
    if _fork_hooks_registered or not hasattr(os, "register_at_fork"):
        return
    owner = os.getpid()

    def after_in_child():
        if _forking_from_main_thread and os.getppid() == owner:
            die_with_parent(owner)

    os.register_at_fork(before=_before_fork, after_in_child=after_in_child)
    _fork_hooks_registered = True
