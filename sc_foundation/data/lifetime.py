"""Children die with their parent: store-build pools and DataLoader workers exit when the process that started them
dies, even by SIGKILL, which runs no cleanup in the parent.

Each worker process runs :data:`_SOURCE` first (a pool ``initializer``: :func:`pool_initializer`; a DataLoader
``worker_init_fn``: :func:`die_with_parent`). On Linux the kernel then sends the worker SIGKILL the moment its parent
exits (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls the parent's pid once a second. Without it a
killed ``python train.py`` left its two store workers (about 890 MB each) and their resource tracker running for
minutes; the tracker now exits by itself once the workers are gone.
"""

from __future__ import annotations

import os

_SOURCE = """
import ctypes, os, signal, sys, threading, time
def watch():  # where prctl is missing or refused: poll the parent's pid
    while os.getppid() == PARENT:
        time.sleep(1.0)
    os._exit(1)
# PR_SET_PDEATHSIG (linux/prctl.h) is option 1: the signal this process gets when its parent dies.
if not sys.platform.startswith("linux") or ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) != 0:
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
if os.getppid() != PARENT:  # the parent died before the line above ran: this process was re-parented already
    os._exit(1)
"""
"""What a worker runs first. Python source, so that a spawned pool worker can run it through ``exec`` before it
unpickles anything of this package: importing the package (torch) takes seconds, which a worker would otherwise
spend orphaned."""


def die_with_parent(parent_pid: int, worker_id: int | None = None) -> None:
    """Make this (worker) process exit when ``parent_pid``, the process that started it, is gone.

    Args:
        parent_pid: ``os.getpid()`` of the parent, read in the parent when it creates the pool or loader.
        worker_id: the DataLoader worker index (``worker_init_fn``'s argument); unused.
    """
    exec(_SOURCE, {"PARENT": parent_pid})


def pool_initializer() -> dict:
    """``initializer`` and ``initargs`` for a ``ProcessPoolExecutor`` whose workers die with this process: the
    builtin ``exec`` of :data:`_SOURCE`, which a spawned worker runs before it imports this package."""
    return {"initializer": exec, "initargs": (_SOURCE, {"PARENT": os.getpid()})}
