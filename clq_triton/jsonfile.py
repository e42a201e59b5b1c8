"""JSON files shared by processes and threads: merged under a file lock, replaced atomically.

Used by the GEMM tuning cache (kernels.tuning) and the quality grid (bench/quality.py):
several processes may add entries to one file at once, and none may lose another's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import uuid
from typing import Any, Callable

_thread_lock = threading.Lock()  # flock is per open file: threads also take this


@contextlib.contextmanager
def locked(path: str):
    """Hold an exclusive lock on ``path`` (through ``path + ".lock"``) across processes and
    threads. The folder must exist."""
    with _thread_lock, open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_atomic(path: str, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` to a temporary name unique to this call, then rename it to ``path``:
    readers see the old file or the new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def dump_json(path: str, obj: Any, **kw) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`write_atomic`)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, **kw)
    write_atomic(path, write)


def merge_json(path: str, merge: Callable[[dict], dict], **kw) -> dict:
    """Under the lock: read ``path`` ({} when absent), write ``merge(old)`` back atomically and
    return it. The folder is created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with locked(path):
        old = {}
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
        new = merge(old)
        dump_json(path, new, **kw)
    return new
