"""SIGKILL crash test of the log partition: a child appends seeded frames and acknowledges each one
after append() returned; the parent kills it at seeded moments (start-up, recovery, mid-append of
large frames, rolls) and checks after every kill that

* every acknowledged frame is present and byte-identical, and
* the recovered log is a prefix of what the child tried to write: contiguous LSNs from 0, every
  frame exactly ``frame_for(seed, lsn)`` (unacknowledged whole frames may survive, partial ones
  never).

MMSB_LOG_CRASH_KILLS and MMSB_LOG_CRASH_SEED change the run; one seed reproduces one kill schedule.
"""

from __future__ import annotations

import os
import sys

import crc32c

import _logchild
from crashkit import run_kill_loop
from mmsb_dist.log import LogPartition

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_logchild.py")
KILLS = int(os.environ.get("MMSB_LOG_CRASH_KILLS", "30"))
SEED = int(os.environ.get("MMSB_LOG_CRASH_SEED", "20250611"))
SEGMENT_BYTES = 4 << 20     # small, so that kills also land around segment rolls


class _Oracle:
    """What the parent knows: the acknowledged LSNs, and the frame the child writes at any LSN."""

    def __init__(self, seed: int):
        self.seed = seed
        self.acked: set[int] = set()
        self.expected: dict[int, tuple] = {}   # lsn -> (count, epoch, size, crc32c of payload)
        self.torn_tails = 0

    def on_line(self, line: str) -> None:
        kind, lsn, *_ = line.split()
        if kind == "ack":
            self.acked.add(int(lsn))

    def frame(self, lsn: int) -> tuple:
        if lsn not in self.expected:
            payload, count, epoch = _logchild.frame_for(self.seed, lsn)
            self.expected[lsn] = (count, epoch, len(payload), crc32c.crc32c(payload))
        return self.expected[lsn]

    def check(self, log_dir: str) -> None:
        if not os.path.isdir(log_dir) or not os.listdir(log_dir):
            assert not self.acked, "acknowledged frames but no log on disk"
            return      # killed before the log existed
        with LogPartition(log_dir, fsync="none", create=False) as log:
            if log.recovery is not None:
                self.torn_tails += 1
                assert log.recovery.segment == log.segments()[-1].path
            lsn, firsts = 0, set()
            for f in log.read():
                assert f.first_lsn == lsn, "LSN gap in the recovered log"
                count, epoch, size, digest = self.frame(lsn)
                assert (f.lsn_count, f.epoch, len(f.payload)) == (count, epoch, size), lsn
                assert crc32c.crc32c(f.payload) == digest, f"wrong bytes at LSN {lsn}"
                firsts.add(lsn)
                lsn = f.end_lsn
            assert lsn == log.next_lsn
        missing = sorted(self.acked - firsts)
        assert not missing, f"acknowledged frames lost: {missing[:10]}"


def _is_large_begin(line: str) -> bool:
    parts = line.split()
    return parts[0] == "begin" and int(parts[2]) >= _logchild.LARGE_BYTES_MIN


def _kill_loop(tmp_path, fsync: str, kills: int, seed: int):
    log_dir = str(tmp_path / "log")
    oracle = _Oracle(seed)
    rounds = run_kill_loop([sys.executable, CHILD, log_dir, str(seed), fsync, str(SEGMENT_BYTES)],
                           oracle.on_line, kills, seed, trigger=_is_large_begin,
                           after_kill=lambda rnd: oracle.check(log_dir))
    return oracle, rounds


def test_sigkill_loses_no_acknowledged_frame_fsync_always(tmp_path):
    oracle, rounds = _kill_loop(tmp_path, "always", KILLS, SEED)
    assert len(rounds) == KILLS >= 25
    assert all(r.returncode < 0 for r in rounds), "a child finished before it was killed"
    assert {r.mode for r in rounds} == {"timer", "trigger"}
    assert len(oracle.acked) > 100
    # Some kills must land inside a large append: the child's last line announced it, no ack came.
    mid_large = [r for r in rounds if r.last_line and _is_large_begin(r.last_line)]
    assert mid_large, "no kill landed inside a large append"
    print(f"\n{len(rounds)} kills, {len(oracle.acked)} acks, {len(mid_large)} mid-large-append, "
          f"{oracle.torn_tails} torn tails truncated")


def test_sigkill_loses_nothing_written_under_interval_and_none(tmp_path):
    # A process crash keeps what reached the OS, so these policies lose nothing either.
    for fsync in ("interval", "none"):
        oracle, rounds = _kill_loop(tmp_path / fsync, fsync, 5, SEED + 1)
        assert len(oracle.acked) > 10
