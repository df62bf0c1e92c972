"""Small file-system primitives shared by the cache writers: atomic writes and advisory locks.

Temporary names always contain ``.tmp`` and never match what readers list (``*.jsonl``,
``part_*.parquet``), so a killed writer leaves nothing a reader would trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp."


def tmp_path_for(path: Path) -> Path:
    """``<dir>/<name>.tmp.<pid>`` beside ``path`` (same file system, so ``os.replace`` is atomic)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temporary file and ``os.replace``."""
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (``flock``) on ``path``, created if needed; blocks until free.

    Serializes writers of the same cache file or shard across processes of one machine (two
    Dagster runs of the same partition, a retry racing its original). The lock disappears with
    the process, so a killed writer never leaves a stale lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(directory: Path) -> int:
    """Delete temporary files (``*.tmp*.<pid>``) of writers that no longer run; returns how many.

    Files of live processes are kept (they may be mid-write). Readers never list temporary
    files, so this is housekeeping, not a correctness step.
    """
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if ".tmp" not in entry.name:
            continue
        pid = entry.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                os.remove(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed
