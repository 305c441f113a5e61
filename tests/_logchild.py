"""Child process of the log crash test: append seeded frames until killed, acknowledging each.

    python tests/_logchild.py LOG_DIR SEED FSYNC SEGMENT_BYTES_MAX

Prints ``ready <next_lsn>`` once the log is open (recovery done), then for every frame
``begin <lsn> <payload bytes>`` before ``append`` and ``ack <lsn>`` after it returned, each line
flushed. The frame appended at LSN ``L`` is ``frame_for(seed, L)``, whatever happened before, so
the parent can check any recovered log without knowing what the child managed to write.
"""

from __future__ import annotations

import os
import random
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARGE_BYTES_MIN = 512 << 10     # frames at least this large count as "large" for kill triggers
RUN_SECONDS_MAX = 30.0          # a child nobody kills stops by itself


def frame_for(seed: int, lsn: int) -> tuple[bytes, int, int]:
    """(payload, lsn_count, epoch) of the frame at ``lsn``: mostly small, ~10% medium, ~2% large
    (0.5 to 2 MiB, so that kills land inside large appends)."""
    rng = random.Random(seed * 1_000_003 + lsn)
    r = rng.random()
    if r < 0.02:
        size = rng.randint(LARGE_BYTES_MIN, 2 << 20)
    elif r < 0.12:
        size = rng.randint(16 << 10, 128 << 10)
    else:
        size = rng.randint(0, 8 << 10)
    # randbytes runs at ~150 MB/s: tile a random block instead, still unique per LSN.
    block = rng.randbytes(min(size, 4096))
    payload = (block * -(-size // len(block)))[:size] if size else b""
    return payload, rng.randint(1, 10_000), lsn // 50_000


def _import_log():
    # mmsb_dist/__init__ imports numba (~0.8 s) and this child is restarted 25+ times per test run;
    # the log needs only mmsb_dist.errors, so load the package namespace without its __init__.
    pkg = types.ModuleType("mmsb_dist")
    pkg.__path__ = [os.path.join(REPO, "mmsb_dist")]
    sys.modules.setdefault("mmsb_dist", pkg)
    from mmsb_dist import log
    return log


def main(argv: list[str]) -> int:
    log_dir, seed, fsync, segment_bytes = argv[0], int(argv[1]), argv[2], int(argv[3])
    log = _import_log().LogPartition(log_dir, fsync=fsync, segment_bytes_max=segment_bytes)
    out = sys.stdout
    out.write(f"ready {log.next_lsn}\n")
    out.flush()
    stop = time.monotonic() + RUN_SECONDS_MAX
    while time.monotonic() < stop:
        lsn = log.next_lsn
        payload, count, epoch = frame_for(seed, lsn)
        out.write(f"begin {lsn} {len(payload)}\n")
        out.flush()
        first = log.append(payload, epoch=epoch, lsn_count=count)
        assert first == lsn, (first, lsn)
        out.write(f"ack {first}\n")
        out.flush()
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
