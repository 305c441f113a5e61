"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this module is
importable as `_common`)."""

from __future__ import annotations

import json
import os


def evict(path: str) -> None:
    """fsync every file under ``path`` (or the file itself) and ask the kernel to drop it from the
    page cache, so that the next read comes from the disk (a hypervisor may still cache it)."""
    walk = os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), None,
                                                       [os.path.basename(path)])]
    for root, _, files in walk:
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_json(path: str, result: dict, seconds: float | None = None) -> None:
    """Write a benchmark's result where it was asked for, and say so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {path}" + (f" ({seconds:.1f} s)" if seconds is not None else ""))
