"""The ordered log: one durable, append-only partition of frames per shard.

A partition is a directory of segment files ``seg-{first_lsn:020d}.log`` holding frames back to
back. A frame is a 40-byte little-endian header (magic, format version, flags, payload length, LSN
count, first LSN, epoch, reserved, CRC32C) followed by an opaque payload (in practice one Arrow IPC
delta batch). The CRC covers the payload and every other header byte. docs/log.md has the
byte-level format, the recovery rules and exactly what each fsync policy guarantees.

The contract with the shard that owns the partition, in order:

1. ``append(payload, epoch=, lsn_count=)`` assigns LSNs ``[first, first + lsn_count)`` (one per
   delta) and returns ``first`` once the frame is durable under the fsync policy. Concurrent callers
   are group-committed: one of them (the leader) writes every pending frame with one ``writev`` and
   one fsync while the others wait for it.
2. The shard applies the batch only after ``append`` returned (write-ahead), then acknowledges it.
   A large batch may instead go through ``append_many_async`` and be applied to memory while the
   log writes it; it is still acknowledged, or shown to anyone, only once durable.
3. ``sync()`` makes everything appended so far durable whatever the policy (the epoch barrier).
4. ``read(from_lsn, to_lsn)`` replays frames in LSN order, verifying every CRC.
5. ``drop_before(lsn)`` deletes whole segments below a checkpoint's LSN cut.
6. Opening runs recovery: a torn tail of the last segment is truncated (``recovery`` says what was
   dropped); any other damage raises CorruptionError naming the segment and the byte offset.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import operator
import os
import re
import struct
import sys
import threading
import time
from array import array
from bisect import bisect_right
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterable, Iterator, NamedTuple

import crc32c

from mmsb_dist import limits
from mmsb_dist.errors import (CorruptionError, LogBusyError, LogClosedError, LogError,
                              LogFailedError)

__all__ = [
    "LogPartition", "Frame", "SegmentInfo", "RecoveryReport", "FSYNC_POLICIES", "checksum_async",
    "LogError", "LogClosedError", "LogFailedError", "LogBusyError",
]

_logger = logging.getLogger(__name__)

# ---- frame format --------------------------------------------------------------------------------

MAGIC = b"MMSL"
LOG_FORMAT_VERSION = 1
FSYNC_POLICIES = ("always", "interval", "none")

# magic, version, flags, payload length, LSN count, first LSN, epoch, reserved, CRC32C
_HEADER = struct.Struct("<4sHHIIQQII")
HEADER_BYTES = _HEADER.size
_CRC_AT = HEADER_BYTES - 4          # the CRC is the last field, so "header less CRC" is one prefix
_U64_MAX = (1 << 64) - 1
_SEGMENT_NAME = re.compile(r"seg-(\d{20})\.log")
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

# The call that makes a segment's bytes durable. fdatasync also persists the file size that appends
# change. A module attribute so that tests can slow it down (to force group commit) or make it fail.
_datasync = os.fdatasync


class Frame(NamedTuple):
    first_lsn: int
    lsn_count: int
    epoch: int
    payload: memoryview

    @property
    def end_lsn(self) -> int:
        return self.first_lsn + self.lsn_count


class SegmentInfo(NamedTuple):
    path: str
    first_lsn: int
    last_lsn: int | None    # None while the segment holds no frame
    bytes: int


class RecoveryReport(NamedTuple):
    """What opening the partition truncated: the torn tail of the last segment."""
    segment: str
    position: int           # byte offset of the first dropped byte (the torn frame's start)
    bytes_dropped: int
    reason: str


class _BadFrame(Exception):
    """A frame that does not verify. ``torn``: short, without magic or failing its CRC, i.e. what
    an interrupted write leaves; otherwise checksummed but unreadable by this build."""

    def __init__(self, reason: str, torn: bool = True):
        super().__init__(reason)
        self.torn = torn


# ---- frames --------------------------------------------------------------------------------------

def _frame_header(payload_crc: int, payload_len: int, first_lsn: int, lsn_count: int,
                  epoch: int) -> bytes:
    head = _HEADER.pack(MAGIC, LOG_FORMAT_VERSION, 0, payload_len, lsn_count, first_lsn, epoch,
                        0, 0)[:_CRC_AT]
    return head + crc32c.crc32c(head, payload_crc).to_bytes(4, "little")


def _parse_frame(buf: memoryview, pos: int, end: int) -> tuple[int, int, int, int]:
    """(frame bytes, first LSN, LSN count, epoch) of the frame at ``pos``, or _BadFrame."""
    if end - pos < HEADER_BYTES:
        raise _BadFrame(f"{end - pos} bytes left, short of a {HEADER_BYTES}-byte frame header")
    magic, version, flags, plen, count, first, epoch, reserved, crc = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        raise _BadFrame(f"no frame magic (found {magic!r})")
    body = pos + HEADER_BYTES
    if plen > end - body:
        raise _BadFrame(f"payload of {plen} bytes runs past the end ({end - body} bytes left)")
    # Payload first, then the header prefix: append() checksums the payload before its LSN is known.
    got = crc32c.crc32c(buf[pos:pos + _CRC_AT], crc32c.crc32c(buf[body:body + plen]))
    if got != crc:
        raise _BadFrame(f"CRC32C mismatch (stored {crc:#010x}, computed {got:#010x})")
    if version != LOG_FORMAT_VERSION or flags or reserved or not count:
        # Checksummed, so not a torn write: a newer build's frame or a writer bug. Never dropped.
        raise _BadFrame(f"unreadable frame (version {version}, flags {flags:#x}, reserved "
                        f"{reserved:#x}, {count} LSNs); this build writes version "
                        f"{LOG_FORMAT_VERSION}", torn=False)
    return HEADER_BYTES + plen, first, count, epoch


_crc_pool: ThreadPoolExecutor | None = None
_crc_pool_lock = threading.Lock()


def checksum_async(payload) -> Future:
    """The frame checksum (CRC32C) of ``payload``, computed on a background thread (crc32c
    releases the GIL): a caller with other work to do first, such as validating the batch it
    is about to log, passes the Future as the 4th element of its frame."""
    global _crc_pool
    with _crc_pool_lock:
        if _crc_pool is None:
            _crc_pool = ThreadPoolExecutor(2, thread_name_prefix="mmsb-log-crc")
    view = memoryview(payload)
    return _crc_pool.submit(crc32c.crc32c, view if view.format == "B" else view.cast("B"))


def _prepare(payload, epoch, lsn_count, crc=None) -> tuple[memoryview, int, int, int]:
    """Validate one frame's inputs and checksum its payload (outside the lock: it is the costly
    part, and crc32c releases the GIL for large buffers). ``crc``: a precomputed checksum of
    ``payload`` (an int, or a Future of one from checksum_async)."""
    view = memoryview(payload)
    if not view.c_contiguous:
        raise ValueError("a log payload must be one contiguous buffer")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    epoch, lsn_count = operator.index(epoch), operator.index(lsn_count)
    if view.nbytes > limits.frame_payload_bytes_max:
        raise ValueError(f"payload of {view.nbytes} bytes is over frame_payload_bytes_max "
                         f"({limits.frame_payload_bytes_max})")
    if not 0 <= epoch <= _U64_MAX:
        raise ValueError(f"epoch {epoch} is not a u64")
    if not 1 <= lsn_count <= limits.frame_lsns_max:
        raise ValueError(f"lsn_count {lsn_count} is outside "
                         f"[1, frame_lsns_max={limits.frame_lsns_max}]")
    if crc is None:
        crc = crc32c.crc32c(view)
    elif isinstance(crc, Future):
        crc = crc.result()
    return view, crc, epoch, lsn_count


def _pieces(views: list, piece: int) -> Iterator[list]:
    """``views`` cut into consecutive lists of at most ``piece`` bytes (views split as needed)."""
    out, size = [], 0
    for v in views:
        while v.nbytes:
            take = min(v.nbytes, piece - size)
            out.append(v[:take])
            v, size = v[take:], size + take
            if size == piece:
                yield out
                out, size = [], 0
    if out:
        yield out


_FADVISE = hasattr(os, "posix_fadvise") and sys.platform.startswith("linux")


def _write_all(fd: int, bufs: list, at: int | None = None) -> None:
    """writev every buffer in order. One writev takes at most IOV_MAX buffers and may write less
    than asked (Linux stops near 2 GiB), so loop until all is out.

    ``at`` (the file offset the buffers start at) asks for early writeback: a large write goes out
    in ``limits.log_writeback_piece_bytes`` pieces, and after each the kernel is told to start
    writing that piece to the disk (posix_fadvise DONTNEED starts writeback of a dirty range and
    drops nothing still dirty), so the disk works while the next piece is copied and the final
    fsync waits for the tail only."""
    views = [v for v in map(memoryview, bufs) if v.nbytes]
    piece = limits.log_writeback_piece_bytes
    if at is None or not _FADVISE or sum(v.nbytes for v in views) < 2 * piece:
        _writev_all(fd, views)
        return
    for part in _pieces(views, piece):
        _writev_all(fd, part)
        n = sum(v.nbytes for v in part)
        os.posix_fadvise(fd, at, n, os.POSIX_FADV_DONTNEED)
        at += n


def _writev_all(fd: int, views: list) -> None:
    i = 0
    while i < len(views):
        done = os.writev(fd, views[i:i + _IOV_MAX])
        if done == 0:
            raise OSError(errno.EIO, "writev made no progress")
        while i < len(views) and done >= views[i].nbytes:
            done -= views[i].nbytes
            i += 1
        if done:
            views[i] = views[i][done:]


# ---- segments and recovery -----------------------------------------------------------------------

class _Segment:
    """One segment file and the index of its published frames (first LSN and offset of each), so
    that reads seek by bisection instead of walking headers."""

    __slots__ = ("path", "first_lsn", "end_lsn", "size", "lsns", "offsets")

    def __init__(self, path: str, first_lsn: int):
        self.path, self.first_lsn, self.end_lsn, self.size = path, first_lsn, first_lsn, 0
        self.lsns, self.offsets = array("Q"), array("Q")

    def add(self, first_lsn: int, lsn_count: int, offset: int, nbytes: int) -> None:
        self.lsns.append(first_lsn)
        self.offsets.append(offset)
        self.end_lsn, self.size = first_lsn + lsn_count, offset + nbytes

    def info(self) -> SegmentInfo:
        return SegmentInfo(self.path, self.first_lsn,
                           self.end_lsn - 1 if self.lsns else None, self.size)


def _segment_path(directory: str, first_lsn: int) -> str:
    return os.path.join(directory, f"seg-{first_lsn:020d}.log")


def _list_segments(directory: str) -> list[tuple[int, str]]:
    """(first LSN, path) of every segment file, oldest first; other names are not ours."""
    found = [(int(m.group(1)), os.path.join(directory, name)) for name in os.listdir(directory)
             if (m := _SEGMENT_NAME.fullmatch(name))]
    return sorted(found)


def _index_frames(view: memoryview, seg: _Segment,
                  deliver: tuple | None) -> tuple[int, _BadFrame | None]:
    """Index every frame from the segment's start; stop at the first bad one and return where it is
    and why (None: the whole file is good frames). ``deliver``: (from_lsn, on_frame), see
    LogPartition's ``recover_into``."""
    pos, end = 0, len(view)
    while pos < end:
        try:
            nbytes, first, count, epoch = _parse_frame(view, pos, end)
        except _BadFrame as bad:
            if not bad.torn:
                raise CorruptionError(str(bad), path=seg.path, position=pos) from None
            return pos, bad
        if first != seg.end_lsn:
            raise CorruptionError(f"LSN gap: frame starts at LSN {first}, expected {seg.end_lsn}",
                                  path=seg.path, position=pos)
        seg.add(first, count, pos, nbytes)
        if deliver is not None and first + count > deliver[0]:
            deliver[1](Frame(first, count, epoch, view[pos + HEADER_BYTES:pos + nbytes]))
        pos += nbytes
    return pos, None


def _next_valid_frame(mm: mmap.mmap, view: memoryview, start: int) -> int | None:
    """Offset of the first checksummed frame at or after ``start``, found by its magic."""
    at = mm.find(MAGIC, start)
    while at != -1:
        try:
            _parse_frame(view, at, len(view))
            return at
        except _BadFrame as bad:
            if not bad.torn:
                return at
        at = mm.find(MAGIC, at + 1)
    return None


def _check_torn_tail(mm, view, pos: int, bad: _BadFrame, path: str, is_last: bool) -> None:
    """A bad frame is only a torn write if it is in the last segment with nothing valid after it;
    anything else is damage that must not be skipped."""
    if not is_last:
        raise CorruptionError(f"bad frame in a segment that is not the last: {bad}",
                              path=path, position=pos)
    after = _next_valid_frame(mm, view, pos + 1)
    if after is not None:
        raise CorruptionError(f"bad frame followed by a valid frame at byte {after}: {bad}",
                              path=path, position=pos)


def _scan_segment(path: str, first_lsn: int, is_last: bool,
                  deliver: tuple | None = None) -> tuple[_Segment, RecoveryReport | None]:
    """Verify and index one segment; truncate a torn tail (last segment only). ``deliver``: see
    _index_frames."""
    seg = _Segment(path, first_lsn)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return seg, None
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    try:
        view = memoryview(mm)
        try:
            pos, bad = _index_frames(view, seg, deliver)
            if bad is not None:
                _check_torn_tail(mm, view, pos, bad, path, is_last)
        finally:
            view.release()
    finally:
        try:
            mm.close()
        except BufferError:  # delivered frames still view it: unmapped once they are gone (a
            pass             # torn tail's truncation below leaves their bytes in place)
    if bad is None:
        return seg, None
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, pos)
        _datasync(fd)
    finally:
        os.close(fd)
    return seg, RecoveryReport(path, pos, size - pos, str(bad))


def _open_dir(path: str, create: bool) -> int:
    """Open (creating it if asked) and lock the partition directory; returns its fd, which also
    serves the directory fsyncs."""
    if not os.path.isdir(path):
        if not create:
            raise FileNotFoundError(errno.ENOENT, "no log partition here", path)
        os.makedirs(path, exist_ok=True)
        parent = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(parent)    # the new directory's entry must survive a crash too
        finally:
            os.close(parent)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LogBusyError(f"log partition {path} is open elsewhere (its directory is locked)") \
            from None
    return fd


# ---- the partition -------------------------------------------------------------------------------

class LogPartition:
    """One shard's durable ordered log. Thread-safe; see the module docstring for the contract.

    ``fsync``: ``"always"`` (durable before append returns), ``"interval"`` (a background thread
    fsyncs at least every ``fsync_interval_ms``) or ``"none"`` (the log never fsyncs on its own;
    ``sync()`` still does). ``start_lsn``: the first LSN of a new, empty log (after a checkpoint
    whose older segments are gone); for an existing log it must lie within the LSNs the log covers.

    ``recover_into``: replay while opening, in the same pass as recovery's scan (a shard's restart
    reads its log once, not twice). Called as ``recover_into(first_lsn)`` once the directory is
    locked and its segments listed, with the first LSN the log holds; it returns None or
    ``(from_lsn, on_frame)``, and then the scan calls ``on_frame(frame)`` with every frame that
    overlaps ``[from_lsn, ...)``, in LSN order, as soon as the frame is verified (CRC, LSN order).
    A frame's payload views the segment's memory mapping; it stays valid as long as it is
    referenced. An exception from either call abandons the open and propagates. The scan may still
    find damage after frames it delivered: the open then raises, as it would have anyway.
    """

    def __init__(self, path, *, fsync: str = "always", fsync_interval_ms: float = 5.0,
                 segment_bytes_max: int | None = None, create: bool = True,
                 start_lsn: int | None = None, recover_into=None):
        if segment_bytes_max is None:
            segment_bytes_max = limits.segment_bytes_max
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync={fsync!r}; expected one of {FSYNC_POLICIES}")
        if not fsync_interval_ms > 0 or segment_bytes_max < 1:
            raise ValueError("fsync_interval_ms and segment_bytes_max must be positive")
        if start_lsn is not None and not 0 <= start_lsn <= _U64_MAX:
            raise ValueError(f"start_lsn {start_lsn} is not a u64")
        self.path = os.fspath(path)
        self.fsync_policy = fsync
        self.fsync_interval_ms = fsync_interval_ms
        self.segment_bytes_max = segment_bytes_max
        self._cond = threading.Condition()
        self._pending: list[tuple[int, list, int]] = []    # (ticket, frames, bytes), LSN order
        self._seq = self._done = 0      # last ticket handed out / last ticket written
        self._leader = self._closed = False
        self._failure: BaseException | None = None
        # Leader-only state: the active segment's fd and size, what an fsync still owes.
        self._dirty, self._dir_dirty, self._unsynced = False, False, []
        self._stats = dict(frames=0, lsns=0, bytes=0, groups=0, writes=0, fsyncs=0,
                           fsync_seconds=0.0, dir_fsyncs=0, segments_created=0)
        self._dir_fd = _open_dir(self.path, create)
        try:
            self.recovery = self._recover(create, start_lsn, recover_into)
            self._active = self._segments[-1]
            self._fd = self._open_append(self._active.path)
        except BaseException:
            os.close(self._dir_fd)
            raise
        self._size, self._next_lsn = self._active.size, self._active.end_lsn
        self._stop = threading.Event()
        self._syncer = None
        self._flusher: ThreadPoolExecutor | None = None  # append_many_async, created on first use
        if fsync == "interval":
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                            name=f"mmsb-log-fsync {self.path}")
            self._syncer.start()

    # ---- opening ---------------------------------------------------------------------------------

    def _recover(self, create: bool, start_lsn: int | None,
                 recover_into) -> RecoveryReport | None:
        found = _list_segments(self.path)
        deliver = None
        if recover_into is not None:
            deliver = recover_into(found[0][0] if found else start_lsn or 0)
        if not found:
            if not create:
                raise FileNotFoundError(errno.ENOENT, "no log segments", self.path)
            self._segments = [self._create_segment(start_lsn or 0)]
            return None
        segments, report = [], None
        for i, (first, path) in enumerate(found):
            if segments and first != segments[-1].end_lsn:
                raise CorruptionError(f"LSN gap between segments: expected a segment starting at "
                                      f"LSN {segments[-1].end_lsn}, found {first}",
                                      path=path, position=0)
            seg, report = _scan_segment(path, first, i == len(found) - 1, deliver)
            segments.append(seg)
        if report is not None:
            _logger.warning("log %s: truncated a torn tail of %d bytes at byte %d of %s (%s)",
                            self.path, report.bytes_dropped, report.position, report.segment,
                            report.reason)
        if start_lsn is not None and not segments[0].first_lsn <= start_lsn <= segments[-1].end_lsn:
            raise LogError(f"start_lsn={start_lsn} is outside [first_lsn, next_lsn] = "
                           f"[{segments[0].first_lsn}, {segments[-1].end_lsn}] of the existing log "
                           f"{self.path}: it does not continue from there")
        self._segments = segments
        return report

    def _create_segment(self, first_lsn: int) -> _Segment:
        path = _segment_path(self.path, first_lsn)
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        self._stats["segments_created"] += 1
        # The new name must be durable before frames in it are acknowledged.
        if self.fsync_policy == "none":
            self._dir_dirty = True
        else:
            self._sync_dir()
        return _Segment(path, first_lsn)

    @staticmethod
    def _open_append(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    # ---- appending -------------------------------------------------------------------------------

    def append(self, payload, *, epoch: int, lsn_count: int) -> int:
        """Log one frame; returns its first LSN once durable under the fsync policy. The payload
        (any contiguous buffer) must not change until this returns."""
        return self.append_many([(payload, epoch, lsn_count)])[0]

    def append_many(self, frames: Iterable[tuple]) -> list[int]:
        """Log ``(payload, epoch, lsn_count)`` frames with consecutive LSNs in one group (one write,
        one fsync); returns the first LSN of each. A frame may carry a 4th element, the payload's
        checksum computed beforehand (an int, or a Future from checksum_async)."""
        prepared = [_prepare(*f) for f in frames]
        if not prepared:
            return []
        ticket, firsts = self._enqueue(prepared)
        self._commit(ticket)
        return firsts

    def append_many_async(self, frames: Iterable[tuple]) -> tuple[list[int], Future]:
        """``append_many`` that returns at once: the first LSN of each frame and a Future that
        completes once they are durable under the fsync policy (or raises the log's error). The
        log's flusher thread writes and syncs them, so the caller can apply the batch to memory
        meanwhile; it must not acknowledge the batch, or let anyone read it, before the Future
        completes. Payloads must not change until then."""
        prepared = [_prepare(*f) for f in frames]
        if not prepared:
            done: Future = Future()
            done.set_result(None)
            return [], done
        ticket, firsts = self._enqueue(prepared)
        with self._cond:
            if self._flusher is None:
                self._flusher = ThreadPoolExecutor(1, thread_name_prefix="mmsb-log-flush")
            flusher = self._flusher
        return firsts, flusher.submit(self._commit, ticket)

    def _enqueue(self, prepared: list) -> tuple[int, list[int]]:
        with self._cond:
            self._check_usable()
            lsn = self._next_lsn
            if lsn + sum(p[3] for p in prepared) > _U64_MAX:
                raise ValueError(f"the log's LSN space is exhausted at LSN {lsn}")
            frames, firsts, nbytes = [], [], 0
            for view, payload_crc, epoch, count in prepared:
                header = _frame_header(payload_crc, view.nbytes, lsn, count, epoch)
                frames.append((lsn, count, header, view))
                firsts.append(lsn)
                lsn += count
                nbytes += HEADER_BYTES + view.nbytes
            self._next_lsn = lsn
            self._seq += 1
            self._pending.append((self._seq, frames, nbytes))
            return self._seq, firsts

    def _commit(self, ticket: int) -> None:
        """Wait until ``ticket`` is written (and fsynced under "always"), leading a group whenever
        no one else is: whoever finds no leader writes everything queued so far."""
        while True:
            with self._cond:
                while self._leader and self._done < ticket:
                    self._cond.wait()
                if self._done >= ticket:
                    return
                if self._failure is not None:
                    raise self._failed_error()
                group = self._take_group()
                self._leader = True
            self._lead(group)

    def _take_group(self) -> list:
        taken = nbytes = 0
        for _, _, size in self._pending:
            if taken and nbytes + size > limits.group_bytes_max:
                break
            taken, nbytes = taken + 1, nbytes + size
        group = self._pending[:taken]
        del self._pending[:taken]
        return group

    def _lead(self, group: list) -> None:
        placed, failure = [], None
        try:
            placed = self._write_group([f for _, frames, _ in group for f in frames])
            if self.fsync_policy == "always":
                self._sync_fd(self._fd)
            else:
                self._dirty = True
        except BaseException as exc:   # noqa: BLE001 - the waiters must learn of any failure
            failure = exc
        with self._cond:
            self._leader = False
            if failure is None:
                self._publish(placed, group[-1][0])
            else:
                self._fail(failure)
            self._cond.notify_all()
        if failure is not None and not isinstance(failure, Exception):
            raise failure

    def _write_group(self, frames: list) -> list:
        """Write frames to the active segment, rolling where one would overflow it; returns where
        each landed. A frame larger than a segment gets a segment of its own."""
        placed, bufs, at = [], [], self._size
        for first, count, header, view in frames:
            nbytes = HEADER_BYTES + view.nbytes
            if self._size and self._size + nbytes > self.segment_bytes_max:
                self._write(bufs, at)
                bufs = []
                self._roll(first)
                at = 0
            placed.append((self._active, first, count, self._size, nbytes))
            bufs += (header, view)
            self._size += nbytes
        self._write(bufs, at)
        return placed

    def _write(self, bufs: list, at: int) -> None:
        if bufs:  # early writeback only where an fsync will follow
            _write_all(self._fd, bufs, None if self.fsync_policy == "none" else at)
            self._stats["writes"] += 1

    def _roll(self, first_lsn: int) -> None:
        """Seal the active segment and start seg-{first_lsn}. The sealed one is made durable first,
        so that a crash never leaves frames in a newer segment behind a hole in an older one."""
        if self.fsync_policy == "none":
            self._unsynced.append(self._active.path)
        else:
            self._sync_fd(self._fd)
        os.close(self._fd)
        self._fd = None
        self._active = self._create_segment(first_lsn)
        self._fd = self._open_append(self._active.path)
        self._size = 0

    def _publish(self, placed: list, done_ticket: int) -> None:
        """Make written frames readable and wake their appenders (called holding the lock)."""
        for seg, first, count, offset, nbytes in placed:
            if seg is not self._segments[-1]:
                self._segments.append(seg)
            seg.add(first, count, offset, nbytes)
            self._stats["lsns"] += count
            self._stats["bytes"] += nbytes
        self._stats["frames"] += len(placed)
        self._stats["groups"] += 1
        self._done = done_ticket

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
            _logger.error("log %s failed: %r; it refuses appends until reopened", self.path, exc)

    def _failed_error(self) -> LogFailedError:
        err = LogFailedError(f"log partition {self.path} failed ({self._failure!r}); close and "
                             "reopen it to recover")
        err.__cause__ = self._failure
        return err

    # ---- durability ------------------------------------------------------------------------------

    def _sync_fd(self, fd: int) -> None:
        t0 = time.perf_counter()
        _datasync(fd)
        self._stats["fsyncs"] += 1
        self._stats["fsync_seconds"] += time.perf_counter() - t0

    def _sync_dir(self) -> None:
        os.fsync(self._dir_fd)
        self._stats["dir_fsyncs"] += 1

    def _sync_owed(self) -> None:
        """fsync what is written but not yet durable (leader only): segments sealed without an
        fsync under "none", new directory entries, then the active segment."""
        while self._unsynced:
            try:
                fd = os.open(self._unsynced[0], os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = None       # dropped by retention since: nothing left to make durable
            if fd is not None:
                try:
                    self._sync_fd(fd)
                finally:
                    os.close(fd)
            self._unsynced.pop(0)
        if self._dir_dirty:
            self._sync_dir()
            self._dir_dirty = False
        if self._dirty:
            self._sync_fd(self._fd)
            self._dirty = False

    @contextmanager
    def _leading(self, check: bool = True):
        """Hold the leader role (the right to touch the segment files) for a non-append action."""
        with self._cond:
            while self._leader:
                self._cond.wait()
            if check:
                self._check_usable()
            self._leader = True
        try:
            yield
        finally:
            with self._cond:
                self._leader = False
                self._cond.notify_all()

    def sync(self) -> None:
        """Make every frame whose append() has returned durable, whatever the policy."""
        with self._leading():
            self._sync_or_fail()

    def _sync_or_fail(self) -> None:
        try:
            self._sync_owed()
        except OSError as exc:
            with self._cond:
                self._fail(exc)
            raise self._failed_error() from exc

    def _sync_loop(self) -> None:
        # "interval": a write is durable within about fsync_interval_ms plus one fsync.
        while not self._stop.wait(self.fsync_interval_ms / 1000):
            try:
                self.sync()
            except LogError:
                return      # closed, or failed: the appenders see the failure themselves

    def close(self) -> None:
        """Write what was accepted before the call, make it durable (unless "none"), release the
        files. Idempotent; later appends and reads raise LogClosedError."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            ticket = self._seq
        try:
            self._commit(ticket)
        except LogFailedError:
            pass    # those appenders got the error; close still releases everything
        finally:
            if self._syncer is not None:
                self._stop.set()
                self._syncer.join()
            if self._flusher is not None:  # its tickets are at or below the one committed above
                self._flusher.shutdown(wait=True)
            self._release()

    def _release(self) -> None:
        with self._leading(check=False):
            try:
                if self._failure is None and self.fsync_policy != "none":
                    self._sync_or_fail()
            finally:
                if self._fd is not None:    # None after a roll that failed midway
                    os.close(self._fd)
                os.close(self._dir_fd)      # drops the directory lock

    def __enter__(self) -> "LogPartition":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading ---------------------------------------------------------------------------------

    def read(self, from_lsn: int = 0, to_lsn: int | None = None) -> Iterator[Frame]:
        """Frames overlapping ``[from_lsn, to_lsn)`` in LSN order, each CRC-verified
        (CorruptionError naming the segment and offset otherwise). Sees the frames whose append
        returned before the call."""
        with self._cond:
            if self._closed:
                raise LogClosedError(f"log partition {self.path} is closed")
            snap = [(seg, len(seg.lsns), seg.size) for seg in self._segments
                    if seg.lsns and seg.end_lsn > from_lsn
                    and (to_lsn is None or seg.first_lsn < to_lsn)]
            if to_lsn is not None and to_lsn <= from_lsn:
                snap = []       # an empty range overlaps no frame
        return self._read_frames(snap, from_lsn, to_lsn)

    def _read_frames(self, snap: list, from_lsn: int, to_lsn: int | None) -> Iterator[Frame]:
        for seg, count, size in snap:
            start = max(bisect_right(seg.lsns, from_lsn, 0, count) - 1, 0)
            try:
                fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise LogError(f"segment {seg.path} was dropped by drop_before() while being "
                               "read") from None
            try:
                for i in range(start, count):
                    if to_lsn is not None and seg.lsns[i] >= to_lsn:
                        return
                    end = seg.offsets[i + 1] if i + 1 < count else size
                    frame = _read_frame(fd, seg.path, seg.offsets[i], end, seg.lsns[i])
                    if frame.end_lsn > from_lsn:
                        yield frame
            finally:
                os.close(fd)

    # ---- retention and status --------------------------------------------------------------------

    def drop_before(self, lsn: int) -> list[str]:
        """Delete the segments whose frames all lie below ``lsn`` (a checkpoint's LSN cut), oldest
        first, never the active one; returns their paths."""
        with self._cond:
            self._check_usable()
            n = 0
            for seg in self._segments[:-1]:
                if seg.end_lsn > lsn:
                    break
                n += 1
            victims = self._segments[:n]
            del self._segments[:n]
        for seg in victims:     # oldest first: a crash midway leaves a contiguous suffix
            os.unlink(seg.path)
        if victims and self.fsync_policy != "none":
            os.fsync(self._dir_fd)
        return [seg.path for seg in victims]

    @property
    def next_lsn(self) -> int:
        """The LSN the next appended frame gets."""
        with self._cond:
            return self._next_lsn

    @property
    def first_lsn(self) -> int:
        """The oldest LSN still retained (a frame's, or next_lsn when the log holds none)."""
        with self._cond:
            return self._segments[0].first_lsn

    def segments(self) -> list[SegmentInfo]:
        with self._cond:
            return [seg.info() for seg in self._segments]

    def statistics(self) -> dict:
        """Counters since open: frames, lsns, bytes (headers included), groups (leader writes),
        writes, fsyncs and fsync_seconds (segment data), dir_fsyncs, segments_created; and now:
        segments, first_lsn, next_lsn."""
        with self._cond:
            return {**self._stats, "segments": len(self._segments),
                    "first_lsn": self._segments[0].first_lsn, "next_lsn": self._next_lsn}

    def _check_usable(self) -> None:
        if self._closed:
            raise LogClosedError(f"log partition {self.path} is closed")
        if self._failure is not None:
            raise self._failed_error()

    def __repr__(self) -> str:
        return (f"LogPartition({self.path!r}, fsync={self.fsync_policy!r}, "
                f"next_lsn={self._next_lsn}, segments={len(self._segments)})")


def _read_frame(fd: int, path: str, offset: int, end: int, first_lsn: int) -> Frame:
    data = memoryview(os.pread(fd, end - offset, offset))
    try:
        nbytes, first, count, epoch = _parse_frame(data, 0, len(data))
    except _BadFrame as bad:
        raise CorruptionError(f"bad frame on read: {bad}", path=path, position=offset) from None
    if nbytes != end - offset or first != first_lsn:
        raise CorruptionError(f"frame at LSN {first} ({nbytes} bytes) is not the indexed frame at "
                              f"LSN {first_lsn} ({end - offset} bytes)", path=path, position=offset)
    return Frame(first, count, epoch, data[HEADER_BYTES:])
