"""Typed errors. Every failure a caller can act on has its own class.

Each error that concerns a place in a page names it: ``page``, ``offset`` and ``length`` are kept as
attributes (``None`` where they do not apply) and appear in the message, so a log line is enough to
find the bad delta. Raising any of these before an apply means nothing was changed.
"""

from __future__ import annotations

__all__ = [
    "MmsbError",
    "UnknownPageError",
    "InvalidDeltaError",
    "InvalidPageError",
    "CapacityError",
    "SerializationError",
    "CorruptionError",
    "GraphCycleError",
    "DerivedPageError",
    "EpochError",
    "OrderError",
    "LogError",
    "LogClosedError",
    "LogFailedError",
    "LogBusyError",
    "LogCompactedError",
    "GatewayError",
]


class MmsbError(Exception):
    """Base class of every error mmsb-dist raises on purpose."""

    def __init__(self, message: str, *, page: int | None = None, offset: int | None = None,
                 length: int | None = None):
        self.page = page
        self.offset = offset
        self.length = length
        where = []
        if page is not None:
            where.append(f"page={page}")
        if offset is not None:
            where.append(f"offset={offset}")
        if length is not None:
            where.append(f"length={length}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)

    def __reduce__(self):
        # Keep the attributes across pickling (Ray ships errors between processes).
        return (_rebuild, (type(self), self.args[0], self.page, self.offset, self.length))


def _rebuild(cls, message, page, offset, length):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.page, err.offset, err.length = page, offset, length
    return err


class UnknownPageError(MmsbError, KeyError):
    """A delta or read names a page id that does not exist (or was freed)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class InvalidDeltaError(MmsbError, ValueError):
    """A delta is malformed: out of the page's bounds, inconsistent lengths, wrong dtype, or a batch
    that is empty or over a limit."""


class InvalidPageError(MmsbError, ValueError):
    """A page cannot be created or freed as asked: size zero or not a multiple of its dtype,
    unsupported dtype, an id that exists already, is reserved or is given twice."""


class CapacityError(MmsbError, MemoryError):
    """An arena cannot hold what was asked (page over ``page_bytes_max``, device out of memory)."""


class SerializationError(MmsbError, ValueError):
    """Bytes that should hold an Arrow batch or a control message do not: wrong schema, wrong
    version, truncated or malformed."""


class CorruptionError(SerializationError):
    """Stored bytes fail their checksum or framing. Names the file and byte offset at fault."""

    def __init__(self, message: str, *, path: str | None = None, position: int | None = None,
                 **where):
        self.path = path
        self.position = position
        if path is not None:
            message = f"{message} [{path} @ byte {position}]"
        super().__init__(message, **where)

    def __reduce__(self):
        return (_rebuild_corruption, (self.args[0], self.path, self.position, self.page,
                                      self.offset, self.length))


def _rebuild_corruption(message, path, position, page, offset, length):
    err = CorruptionError.__new__(CorruptionError)
    Exception.__init__(err, message)
    err.path, err.position = path, position
    err.page, err.offset, err.length = page, offset, length
    return err


class GraphCycleError(MmsbError, ValueError):
    """A dependency registration would close a cycle; nothing was registered."""


class DerivedPageError(InvalidDeltaError):
    """A write names a derived page: derived pages change only by recompute (undepend first)."""


class EpochError(MmsbError, RuntimeError):
    """The epoch protocol was driven out of order (sealing a past epoch, reading an epoch that was
    never committed or is no longer retained, a stale coordinator)."""


class OrderError(MmsbError, RuntimeError):
    """A batch reached its shard before an earlier batch of the same ``write_many`` call that it
    must follow (Ray re-sends calls after an actor restart without an order guarantee), and that
    one did not arrive within ``limits.shard_order_wait_s``. Nothing was applied; the client
    re-sends its batches in order."""


class LogError(MmsbError, RuntimeError):
    """A log partition cannot do what was asked (damage on disk is a CorruptionError instead)."""


class LogClosedError(LogError):
    """The partition was closed; open a new LogPartition to append or read."""


class LogFailedError(LogError):
    """A write or fsync failed. What reached the disk is unknown (and a failed fsync must not be
    retried), so the partition refuses every later append; close and reopen it to recover."""


class LogBusyError(LogError):
    """Another open LogPartition, in this process or another, holds the directory."""


class LogCompactedError(LogError):
    """A read from an LSN that retention (``compact``) has dropped: the events or frames asked for
    are gone. Never skipped silently; resume from ``first_lsn`` (the oldest retained) knowingly,
    or rebuild from a checkpoint."""

    def __init__(self, message: str, *, first_lsn: int | None = None, **where):
        self.first_lsn = first_lsn
        super().__init__(message, **where)

    def __reduce__(self):
        return (_rebuild_compacted, (self.args[0], self.first_lsn))


def _rebuild_compacted(message, first_lsn):
    err = LogCompactedError.__new__(LogCompactedError)
    Exception.__init__(err, message)
    err.first_lsn, err.page, err.offset, err.length = first_lsn, None, None, None
    return err


class GatewayError(MmsbError, RuntimeError):
    """The HTTP gateway cannot start as asked: a non-loopback address without a token, an address
    it cannot bind, or another gateway of the same namespace with different settings."""
