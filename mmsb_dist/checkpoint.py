"""Checkpoints of one shard's arena, on local disk or any pyarrow.fs filesystem (S3 included).

A checkpoint is one directory, ``{location}/shard-{shard:04d}/epoch-{epoch:020d}/``, holding
``pages.arrow`` (one Arrow IPC file: the page table and the page bytes of an ArenaSnapshot) and
``manifest.json`` (what the checkpoint is, and the size and CRC32C of every file; it carries a
CRC32C of its own body). docs/checkpoints.md describes both byte by byte.

The publish protocol, which every reader relies on (``write_checkpoint``):

1. Check the snapshot against the state hash the shard reported (its page hashes must combine to it).
2. If the directory holds a complete checkpoint already, return it when it is the same state (a
   retried write) and refuse it otherwise; if it holds an incomplete one (no manifest: a writer
   crashed), remove it.
3. Stream ``pages.arrow`` out, computing its CRC32C over the bytes as they are written. On a local
   disk it goes to a temp name, is fsynced, renamed into place, and the directory is fsynced.
4. Write ``manifest.json`` last, the same way. The checkpoint exists from the moment its manifest
   does: on a local disk that is the rename (atomic), on an object store the completed PUT (atomic
   per object, but no rename and no fsync, so the data files go first and the manifest last).

Readers (``list_checkpoints``, ``latest_checkpoint``) see only directories with a manifest;
``remove_incomplete`` deletes the rest. ``delete_checkpoint`` removes the manifest first, so a crash
half way leaves an incomplete directory, never a manifest naming missing files.

``read_checkpoint`` verifies the manifest's own checksum, every file's size and CRC32C, and the page
hashes recomputed from the bytes (and through them the state hash) against the stored ones; any
mismatch raises CorruptionError naming the file and, where known, the byte position and the page.

``CheckpointWriter`` runs these writes on one background thread, so a shard takes the snapshot (a
host copy) synchronously and pays no I/O on its own path.
"""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import crc32c
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from mmsb_dist import _cpu, limits
from mmsb_dist.arena import DTYPES, ArenaSnapshot, page_chunks
from mmsb_dist.formats import _schema
from mmsb_dist.backend import get_backend
from mmsb_dist.errors import CorruptionError, EpochError, MmsbError, SerializationError

__all__ = [
    "CHECKPOINT_FORMAT_VERSION", "CHECKPOINT_SCHEMA", "CheckpointFile", "CheckpointInfo",
    "CheckpointWriter", "write_checkpoint", "read_checkpoint", "list_checkpoints",
    "latest_checkpoint", "delete_checkpoint", "remove_incomplete",
]

CHECKPOINT_FORMAT_VERSION = 1
DATA_FILE = "pages.arrow"
MANIFEST_FILE = "manifest.json"
_TMP_SUFFIX = ".tmp"

CHECKPOINT_SCHEMA = _schema("checkpoint", [
    pa.field("page_id", pa.uint64(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("version", pa.uint64(), nullable=False),
    pa.field("dtype", pa.uint8(), nullable=False),
    pa.field("hash", pa.uint64(), nullable=False),
    # large_binary: int64 offsets, so one shard's pages may total more than 2 GiB.
    pa.field("data", pa.large_binary(), nullable=False),
], version=CHECKPOINT_FORMAT_VERSION)
_SCHEMA_META = CHECKPOINT_SCHEMA.metadata

_COMPRESSIONS = (None, "lz4", "zstd")
_U64 = 1 << 64
_DIR_RE = re.compile(r"^shard-(\d{4,})/epoch-(\d{20})(?:/(.*))?$")
# A stored page hash that differs from the recomputed one in at most this many bits is taken to be
# the damaged part (damage in the page's bytes flips ~32 of 64 bits; <= 8 with p ~ 2^-32).
_HASH_DAMAGE_BITS_MAX = 8
_HEX8 = re.compile(rb"[0-9a-f]{8}")
_HEX16 = re.compile(r"[0-9a-f]{16}")

# The manifest is JSON framed so that its checksum covers the exact bytes of its body:
#   {"crc32c":"<8 lowercase hex digits>","manifest":<body>}\n
# A reader checks the fixed frame byte for byte and the CRC32C over <body> before parsing anything.
_M_HEAD = b'{"crc32c":"'
_M_MID = b'","manifest":'
_M_TAIL = b"}\n"


@dataclass(frozen=True)
class CheckpointFile:
    name: str      # inside the checkpoint directory
    bytes: int
    crc32c: int


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint, as its manifest describes it.

    The checkpoint holds the shard's state after every delta with LSN < ``lsn`` (the epoch's cut).
    ``path`` is the checkpoint directory in ``filesystem``'s terms.
    """

    path: str
    shard: int
    epoch: int
    lsn: int
    state_hash: int
    page_count: int
    page_bytes: int   # sum of the page sizes (what the arena holds, not what the files take)
    next_id: int
    compression: str | None
    files: tuple[CheckpointFile, ...]
    filesystem: pafs.FileSystem | None = field(default=None, compare=False, repr=False)
    # What the owner of the checkpoint keeps beside the pages (JSON values), e.g. a shard engine's
    # sealed epochs and the delta ids it applied. Covered by the manifest checksum.
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def stored_bytes(self) -> int:
        return sum(f.bytes for f in self.files)


# ---- locations ---------------------------------------------------------------------------------


def _resolve(location, filesystem) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path in its terms) of a directory path or URI."""
    location = os.fspath(location)
    if filesystem is not None:
        path = location.split("://", 1)[1] if "://" in location else location
        if isinstance(filesystem, pafs.LocalFileSystem):
            path = os.path.abspath(path)
        return filesystem, path.rstrip("/") or "/"
    if "://" in location:
        fs, path = pafs.FileSystem.from_uri(location)
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(location)


def _local_root(fs) -> str | None:
    """The OS path that ``fs`` paths are relative to, when ``fs`` is a local disk (fsync applies)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return ""
    if isinstance(fs, pafs.SubTreeFileSystem) and isinstance(fs.base_fs, pafs.LocalFileSystem):
        return fs.base_path
    return None


def _os_path(fs, path: str) -> str | None:
    root = _local_root(fs)
    if root is None:
        return None
    return os.path.join(root, path.lstrip("/")) if root else path


def _join(*parts: str) -> str:
    head, *rest = parts
    return "/".join([head.rstrip("/")] + [p.strip("/") for p in rest]) if rest else head


def checkpoint_dir(root: str, shard: int, epoch: int) -> str:
    return _join(root, f"shard-{shard:04d}", f"epoch-{epoch:020d}")


def fsync_path(os_path: str, directory: bool = False) -> None:
    """fsync a file, or a directory (after a rename in it: the new entry survives a crash)."""
    fd = os.open(os_path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- manifest ----------------------------------------------------------------------------------


def _encode_manifest(body: dict) -> bytes:
    inner = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return b"".join([_M_HEAD, b"%08x" % crc32c.crc32c(inner), _M_MID, inner, _M_TAIL])


def _first_difference(blob: bytes, start: int, expected: bytes) -> int:
    got = blob[start:start + len(expected)]
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            return start + i
    return start + len(got)


def _decode_manifest(blob: bytes, path: str) -> dict:
    """The manifest's body, after checking its frame and its CRC32C (CorruptionError otherwise)."""
    n = len(blob)
    crc_at, mid_at = len(_M_HEAD), len(_M_HEAD) + 8
    body_at = mid_at + len(_M_MID)
    if n < body_at + len(_M_TAIL):
        raise CorruptionError(f"manifest of {n} bytes is too short to be one", path=path, position=n)
    if not blob.startswith(_M_HEAD):
        raise CorruptionError("manifest does not start with its frame", path=path,
                              position=_first_difference(blob, 0, _M_HEAD))
    if not _HEX8.fullmatch(blob[crc_at:mid_at]):
        raise CorruptionError("manifest checksum is not 8 lowercase hex digits", path=path,
                              position=crc_at)
    if blob[mid_at:body_at] != _M_MID:
        raise CorruptionError("manifest frame is damaged", path=path,
                              position=_first_difference(blob, mid_at, _M_MID))
    if not blob.endswith(_M_TAIL):
        raise CorruptionError("manifest does not end with its frame (truncated?)", path=path,
                              position=n - len(_M_TAIL))
    inner = blob[body_at:n - len(_M_TAIL)]
    stored, actual = int(blob[crc_at:mid_at], 16), crc32c.crc32c(inner)
    if stored != actual:
        raise CorruptionError(f"manifest body has CRC32C {actual:08x}, its frame says {stored:08x}",
                              path=path, position=body_at)
    try:
        body = json.loads(inner)
    except ValueError as exc:  # only a writer bug gets here: the checksum matched
        raise CorruptionError(f"manifest body is not JSON: {exc}", path=path,
                              position=body_at) from exc
    if not isinstance(body, dict) or body.get("format") != "mmsb.checkpoint":
        raise SerializationError(f"{path} is not an mmsb checkpoint manifest")
    if body.get("version") != CHECKPOINT_FORMAT_VERSION:
        raise SerializationError(f"{path}: unsupported checkpoint format version "
                                 f"{body.get('version')!r}; this build reads "
                                 f"{CHECKPOINT_FORMAT_VERSION}")
    return body


def _info_from_manifest(body: dict, path: str, dir_path: str, fs) -> CheckpointInfo:
    def u64(key):
        v = body.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < _U64:
            raise SerializationError(f"{path}: manifest field {key!r} is {v!r}, not a u64")
        return v

    try:
        files = tuple(CheckpointFile(f["name"], f["bytes"], int(f["crc32c"], 16))
                      for f in body["files"])
        state_hash = body["state_hash"]
        compression = body["compression"]
        ok = (all(isinstance(f.name, str) and f.name and "/" not in f.name and f.name[0] != "."
                  and isinstance(f.bytes, int) and f.bytes >= 0 for f in files)
              and all(_HEX8.fullmatch(f["crc32c"].encode()) for f in body["files"])
              and isinstance(state_hash, str) and _HEX16.fullmatch(state_hash)
              and compression in _COMPRESSIONS and any(f.name == DATA_FILE for f in files))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SerializationError(f"{path}: malformed manifest fields: {exc}") from exc
    extra = body.get("extra", {})
    if not ok or not isinstance(extra, dict):
        raise SerializationError(f"{path}: malformed manifest fields")
    return CheckpointInfo(dir_path, u64("shard"), u64("epoch"), u64("lsn"), int(state_hash, 16),
                          u64("page_count"), u64("page_bytes"), u64("next_id"), compression, files,
                          fs, extra)


def _load_info(fs, dir_path: str) -> CheckpointInfo:
    """The CheckpointInfo of the checkpoint in ``dir_path`` (FileNotFoundError when it has no
    manifest), checked against the directory's own name."""
    path = _join(dir_path, MANIFEST_FILE)
    with fs.open_input_stream(path, compression=None) as f:
        blob = f.read(limits.manifest_bytes_max + 1)
    if len(blob) > limits.manifest_bytes_max:
        raise CorruptionError(f"manifest is over manifest_bytes_max={limits.manifest_bytes_max}",
                              path=path, position=limits.manifest_bytes_max)
    info = _info_from_manifest(_decode_manifest(blob, path), path, dir_path, fs)
    m = re.search(r"shard-(\d{4,})/epoch-(\d{20})$", dir_path)
    if m and (int(m.group(1)), int(m.group(2))) != (info.shard, info.epoch):
        raise CorruptionError(f"manifest of shard {info.shard} epoch {info.epoch} found in the "
                              "directory of another checkpoint", path=path)
    return info


# ---- writing -----------------------------------------------------------------------------------


class _ChecksummingSink:
    """A file-like object for pyarrow's IPC writer: forwards bytes to ``out`` in chunks, keeping a
    running CRC32C and byte count. pyarrow hands it body buffers zero-copy (as pa.Buffer)."""

    def __init__(self, out, filling=None):
        self._out = out
        self.crc = 0
        self.size = 0
        self.closed = False
        # (address, size, SnapshotFill) of a buffer still being copied: a piece that lies in it
        # is written once the copy has passed it; ``waited`` counts those bytes.
        self._filling = filling
        self.waited = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        at = np.frombuffer(view, np.uint8).ctypes.data if self._filling and n else None
        for i in range(0, n, limits.checkpoint_io_chunk_bytes):
            piece = view[i:i + limits.checkpoint_io_chunk_bytes]
            if at is not None:
                self._await(at + i, len(piece))
            self.crc = crc32c.crc32c(piece, self.crc)
            self._out.write(piece)
        self.size += n
        return n

    def _await(self, address: int, n: int) -> None:
        base, size, fill = self._filling
        lo, hi = max(address, base), min(address + n, base + size)
        if lo < hi:
            fill.wait(hi - base)
            self.waited += hi - lo

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _check_snapshot(snap: ArenaSnapshot, state_hash: int) -> None:
    n = snap.page_ids.size
    for name in ("sizes", "versions", "dtypes", "hashes"):
        if getattr(snap, name).size != n:
            raise ValueError(f"snapshot has {n} page ids but {getattr(snap, name).size} {name}")
    total = int(snap.sizes.sum()) if n else 0
    if snap.data.size != total:
        raise ValueError(f"snapshot data holds {snap.data.size} bytes; its pages {total}")
    if n and (snap.sizes.min() < 1 or int(snap.dtypes.max()) >= len(DTYPES)):
        raise ValueError("snapshot has a page of size < 1 or an unknown dtype code")
    combined = snap.state_hash() if n else 0
    if combined != int(state_hash):
        raise ValueError(f"snapshot's page hashes combine to {combined:016x}, not the reported "
                         f"state hash {int(state_hash):016x}")


def _record_batch(snap: ArenaSnapshot) -> pa.RecordBatch:
    """The snapshot as one record batch, every column a zero-copy view of the snapshot's arrays."""
    n = snap.page_ids.size
    col = lambda a, t: pa.Array.from_buffers(
        t, n, [None, pa.py_buffer(np.ascontiguousarray(a, dtype=t.to_pandas_dtype()))])
    data = pa.Array.from_buffers(pa.large_binary(), n, [
        None, pa.py_buffer(snap.starts), pa.py_buffer(np.ascontiguousarray(snap.data, np.uint8))])
    return pa.RecordBatch.from_arrays(
        [col(snap.page_ids, pa.uint64()), col(snap.sizes, pa.int64()),
         col(snap.versions, pa.uint64()), col(snap.dtypes, pa.uint8()),
         col(snap.hashes, pa.uint64()), data], schema=CHECKPOINT_SCHEMA)


def _publish(fs, dir_path: str, name: str, produce, filling=None) -> CheckpointFile:
    """Write one file of a checkpoint through ``produce(sink)``; atomically where the disk is local.
    ``filling``: see _ChecksummingSink."""
    final = _join(dir_path, name)
    os_final = _os_path(fs, final)
    target = final + _TMP_SUFFIX if os_final else final
    try:
        with fs.open_output_stream(target, compression=None) as out:
            sink = _ChecksummingSink(out, filling)
            produce(sink)
        if os_final:
            fsync_path(os_final + _TMP_SUFFIX)
            fs.move(target, final)
            fsync_path(os.path.dirname(os_final), directory=True)
    except BaseException:
        try:
            fs.delete_file(target)
        except OSError:
            pass  # the directory stays incomplete; the next write or remove_incomplete clears it
        raise
    return CheckpointFile(name, sink.size, sink.crc)


def write_checkpoint(snapshot: ArenaSnapshot, location, *, shard: int, epoch: int, lsn: int,
                     state_hash: int, compression: str | None = None,
                     filesystem: pafs.FileSystem | None = None,
                     extra: dict | None = None, fill=None) -> CheckpointInfo:
    """Write ``snapshot`` as the checkpoint of ``shard`` at ``epoch`` (holding every delta with
    LSN < ``lsn``) under ``location`` (a directory or a URI pyarrow.fs understands; or a path in
    ``filesystem``). Returns its CheckpointInfo once published. Idempotent for the same state;
    EpochError if a different checkpoint of that shard and epoch exists.

    ``fill``: the snapshot's page bytes are still being copied (arena.SnapshotFill); each piece
    is written once the copy has passed it (compressed: once it is done)."""
    for name, v in (("shard", shard), ("epoch", epoch), ("lsn", lsn), ("state_hash", state_hash)):
        if not isinstance(v, (int, np.integer)) or not 0 <= int(v) < _U64:
            raise ValueError(f"{name}={v!r} is not a u64")
    shard, epoch, lsn, state_hash = int(shard), int(epoch), int(lsn), int(state_hash)
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression {compression!r}: expected one of {_COMPRESSIONS}")
    _check_snapshot(snapshot, state_hash)
    fs, root = _resolve(location, filesystem)
    dir_path = checkpoint_dir(root, shard, epoch)
    n, page_bytes = int(snapshot.page_ids.size), int(snapshot.data.size)

    existing = _existing(fs, dir_path)
    if existing is not None:
        if (existing.lsn, existing.state_hash, existing.page_count, existing.page_bytes,
                existing.next_id) == (lsn, state_hash, n, page_bytes, int(snapshot.next_id)):
            return existing
        raise EpochError(f"shard {shard} already has a different checkpoint at epoch {epoch} "
                         f"(lsn {existing.lsn}, state hash {existing.state_hash:016x})")
    fs.create_dir(dir_path, recursive=True)
    os_dir = _os_path(fs, dir_path)
    if os_dir:  # the new directory entries must be durable before a manifest can refer to them
        d = os_dir
        for _ in range(3):  # epoch-*, shard-* and the root itself may all be new
            d = os.path.dirname(d)
            fsync_path(d, directory=True)

    schema = CHECKPOINT_SCHEMA.with_metadata({
        **_SCHEMA_META, b"mmsb.shard": str(shard).encode(), b"mmsb.epoch": str(epoch).encode()})
    batch = _record_batch(snapshot)
    options = pa.ipc.IpcWriteOptions(compression=compression)

    filling = None
    if fill is not None and snapshot.data.size:
        if compression is None:  # the IPC writer hands the page bytes to the sink as they are
            filling = (snapshot.data.ctypes.data, snapshot.data.size, fill)
        else:
            fill.wait()

    def write_pages(sink):
        with pa.ipc.new_file(sink, schema, options=options) as writer:
            writer.write_batch(batch)
        if filling and sink.waited != snapshot.data.size:  # never write bytes not copied yet
            raise RuntimeError(f"{sink.waited} of the {snapshot.data.size} page bytes reached "
                               "the file from the snapshot being copied")

    data_file = _publish(fs, dir_path, DATA_FILE, write_pages, filling)
    body = {
        "format": "mmsb.checkpoint", "version": CHECKPOINT_FORMAT_VERSION,
        "shard": shard, "epoch": epoch, "lsn": lsn, "state_hash": f"{state_hash:016x}",
        "page_count": n, "page_bytes": page_bytes, "next_id": int(snapshot.next_id),
        "compression": compression,
        "files": [{"name": data_file.name, "bytes": data_file.bytes,
                   "crc32c": f"{data_file.crc32c:08x}"}],
        "extra": dict(extra or {}),
    }
    blob = _encode_manifest(body)
    _publish(fs, dir_path, MANIFEST_FILE, lambda sink: sink.write(blob))
    return CheckpointInfo(dir_path, shard, epoch, lsn, state_hash, n, page_bytes,
                          int(snapshot.next_id), compression, (data_file,), fs, dict(extra or {}))


def _existing(fs, dir_path: str) -> CheckpointInfo | None:
    """The complete checkpoint in ``dir_path``, if any; an incomplete one is removed."""
    if fs.get_file_info(_join(dir_path, MANIFEST_FILE)).type == pafs.FileType.File:
        return _load_info(fs, dir_path)
    if fs.get_file_info(dir_path).type != pafs.FileType.NotFound:
        fs.delete_dir(dir_path)
    return None


# ---- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Byte positions in the pages file of the page bytes and of the hash column (None: the file
    is compressed, so they have no position in it)."""

    data_at: int | None
    hashes_at: int | None


def _fetch(fs, path: str, entry: CheckpointFile, verify: bool) -> tuple[np.ndarray, int | None]:
    """(the file's bytes, their CRC32C or None when not yet computed), after checking the size.

    A local file is memory-mapped rather than read: its bytes come straight from the page cache,
    no copy is made, and the snapshot's arrays are views of the mapping (alive as long as they
    are). Its CRC32C is left to _crc_and_hashes, which fuses it with the page hashes. Other
    filesystems are read sequentially, the CRC32C updated as each chunk lands."""
    st = fs.get_file_info(path)
    if st.type != pafs.FileType.File:
        raise CorruptionError("checkpoint file is missing", path=path, position=0)
    if st.size != entry.bytes:
        raise CorruptionError(f"file has {st.size} bytes, the manifest says {entry.bytes}"
                              f"{' (truncated)' if st.size < entry.bytes else ''}",
                              path=path, position=min(st.size, entry.bytes))
    os_path = _os_path(fs, path)
    if os_path is None or not entry.bytes:
        return _read_stream(fs, path, entry.bytes, verify)
    with pa.memory_map(os_path, "r") as mapped:  # its buffers outlive the file object
        buf = np.frombuffer(mapped.read_buffer(), np.uint8)
    if buf.size != entry.bytes:  # changed since the stat above
        raise CorruptionError(f"file has {buf.size} bytes, the manifest says {entry.bytes}",
                              path=path, position=min(buf.size, entry.bytes))
    return buf, None


def _read_stream(fs, path: str, nbytes: int, verify: bool) -> tuple[np.ndarray, int | None]:
    buf = np.empty(nbytes, np.uint8)
    view = memoryview(buf)
    crc, pos = 0, 0
    with fs.open_input_stream(path, compression=None) as f:
        while pos < nbytes:
            got = f.readinto(view[pos:pos + limits.checkpoint_io_chunk_bytes])
            if not got:
                raise CorruptionError(f"file ends at byte {pos}, the manifest says {nbytes}",
                                      path=path, position=pos)
            if verify:
                crc = crc32c.crc32c(view[pos:pos + got], crc)
            pos += got
        if f.read(1):
            raise CorruptionError(f"file is longer than the {nbytes} bytes the manifest says",
                                  path=path, position=nbytes)
    return buf, (crc if verify else None)


def _crc_and_hashes(buf: np.ndarray, snap: ArenaSnapshot | None, layout: _Layout | None,
                    hashes: bool) -> tuple[int, np.ndarray | None]:
    """CRC32C of the whole file and, when asked and the page bytes lie in the file uncompressed,
    the recomputed page hashes, in one pass: this thread checksums chunk after chunk (faulting the
    mapping in), a second one hashes each chunk's pages right behind it while they are in cache.
    Both kernels release the GIL; two passes over a cold mapping cost half as much again."""
    view = memoryview(buf)
    data_at = None if layout is None else layout.data_at
    if snap is None or data_at is None or not hashes or snap.page_ids.size == 0:
        crc = 0
        for i in range(0, buf.size, limits.checkpoint_io_chunk_bytes):
            crc = crc32c.crc32c(view[i:i + limits.checkpoint_io_chunk_bytes], crc)
        return crc, None
    starts, sizes, n = snap.starts, snap.sizes, snap.page_ids.size
    out = np.empty(n, np.uint64)
    chunk = limits.checkpoint_io_chunk_bytes
    crc = crc32c.crc32c(view[:data_at])
    with ThreadPoolExecutor(1, thread_name_prefix="mmsb-restore-hash") as pool:
        pending = []
        for a, b in page_chunks(starts, chunk):  # a page larger than a chunk: one group
            crc = crc32c.crc32c(view[data_at + int(starts[a]):data_at + int(starts[b])], crc)
            pending.append(pool.submit(_hash_pages, snap.data, starts, sizes, a, b, out))
        crc = crc32c.crc32c(view[data_at + int(starts[-1]):], crc)
        for f in pending:
            f.result()
    return crc, out


def _hash_pages(data: np.ndarray, starts: np.ndarray, sizes: np.ndarray, a: int, b: int,
                out: np.ndarray) -> None:
    """``out[a:b]`` = hashes of pages a..b-1, on the CPU backend (the definition of a page hash).

    The CPU kernel takes its word-at-a-time path only for a buffer a whole number of words long,
    so pages ending within the last whole word go through a view of that length."""
    be = get_backend("numpy")
    whole = data.size // 8 * 8
    head = min(b, int(np.searchsorted(starts[1:], whole, side="right")))
    if a < head:
        out[a:head] = be.page_hash(data[:whole], starts[a:head], sizes[a:head])
    if max(a, head) < b:
        lo = max(a, head)
        out[lo:b] = be.page_hash(data, starts[lo:b], sizes[lo:b])


def _page_hashes(data: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """All page hashes, over a few threads (the kernel releases the GIL)."""
    n = sizes.size
    out = np.empty(n, np.uint64)
    threads = max(1, min(limits.restore_hash_threads_max, os.cpu_count() or 1))
    targets = np.linspace(0, int(starts[-1]), threads + 1)[1:-1]
    cuts = sorted({0, n, *np.searchsorted(starts[:n + 1], targets).tolist()})
    parts = list(zip(cuts[:-1], cuts[1:]))
    if len(parts) > 1:
        with ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(lambda ab: _hash_pages(data, starts, sizes, *ab, out), parts))
    elif parts:
        _hash_pages(data, starts, sizes, *parts[0], out)
    return out


def _first_bad_page(snap: ArenaSnapshot, hashes: np.ndarray, layout: _Layout, path: str,
                    message: str) -> CorruptionError | None:
    """The error naming the page whose recomputed hash differs from its stored one.

    Which of the two is damaged: a changed byte changes a page's hash in about half its 64 bits,
    so a stored hash a few bits off its page's hash is itself the damaged part. Only a single bad
    page is located: when several disagree, the damage may be in the file's structure (a buffer
    descriptor that moves where the page bytes are read from), which no page position describes."""
    bad = np.flatnonzero(hashes != snap.hashes)
    if not bad.size:
        return None
    if bad.size > 1:
        return CorruptionError(f"{message}; {bad.size} pages disagree with their stored hashes "
                               "(damage across pages or in the file's structure)", path=path)
    i = int(bad[0])
    page = int(snap.page_ids[i])
    if int(hashes[i] ^ snap.hashes[i]).bit_count() <= _HASH_DAMAGE_BITS_MAX:
        at = None if layout.hashes_at is None else layout.hashes_at + 8 * i
        what = f"page {page}'s stored hash is damaged"
    else:
        at = None if layout.data_at is None else layout.data_at + int(snap.starts[i])
        what = f"page {page}'s bytes do not match its stored hash"
    return CorruptionError(f"{message}; {what} ({bad.size} pages differ)", path=path,
                           position=at, page=page)


def _parse_pages(buf: np.ndarray, path: str, info: CheckpointInfo | None
                 ) -> tuple[ArenaSnapshot, _Layout]:
    """(snapshot with the *stored* hashes, where its parts lie in the file). Every array is a
    zero-copy view of ``buf`` where the file is uncompressed."""
    try:
        return _parse_batch(buf, path, info)
    except MmsbError:
        raise
    except (pa.ArrowException, ValueError, TypeError, OSError, IndexError) as exc:
        raise CorruptionError(f"malformed pages file: {exc}", path=path) from exc


def _parse_batch(buf, path, info):
    reader = pa.ipc.open_file(pa.py_buffer(buf))
    meta = reader.schema.metadata or {}
    for key, value in _SCHEMA_META.items():
        if meta.get(key) != value:
            raise CorruptionError(f"not a v{CHECKPOINT_FORMAT_VERSION} checkpoint pages file "
                                  f"({key.decode()}={meta.get(key)!r})", path=path)
    if not reader.schema.remove_metadata().equals(CHECKPOINT_SCHEMA.remove_metadata()):
        raise CorruptionError(f"pages file has columns {reader.schema.types}", path=path)
    if info is not None and (meta.get(b"mmsb.shard"), meta.get(b"mmsb.epoch")) != (
            str(info.shard).encode(), str(info.epoch).encode()):
        raise CorruptionError("pages file belongs to another checkpoint", path=path)
    if reader.num_record_batches != 1:
        raise CorruptionError(f"expected one record batch, found {reader.num_record_batches}",
                              path=path)
    rb = reader.get_batch(0)
    rb.validate(full=True)  # offsets monotonic and inside the data buffer: safe to index below
    n = rb.num_rows
    page_ids, sizes, versions, dtypes, hashes = (rb.column(i).to_numpy() for i in range(5))
    _, offsets_buf, data_buf = rb.column(5).buffers()
    starts = np.frombuffer(offsets_buf, np.int64, count=n + 1)
    total = int(starts[-1])
    data = np.frombuffer(data_buf, np.uint8, count=total) if total else np.zeros(0, np.uint8)
    if starts[0] != 0 or not np.array_equal(np.diff(starts), sizes):
        raise CorruptionError("page sizes disagree with the page bytes' offsets", path=path)
    if n and (sizes.min() < 1 or int(dtypes.max()) >= len(DTYPES)):
        raise CorruptionError("a page of size < 1 or an unknown dtype code", path=path)
    if n > 1:
        ordered = np.sort(page_ids)
        if np.any(ordered[1:] == ordered[:-1]):
            raise CorruptionError("a page id appears twice", path=path)
    next_id = info.next_id if info is not None else 0
    snap = ArenaSnapshot(page_ids, sizes, versions, dtypes, hashes, data, next_id)
    return snap, _Layout(_position(buf, data_buf, total), _position(buf, rb.column(4).buffers()[1],
                                                                     8 * n))


def _position(buf: np.ndarray, part, nbytes: int) -> int | None:
    """Where ``part`` (an Arrow buffer) lies in ``buf``; None when elsewhere (decompressed)."""
    if part is None or not nbytes:
        return None
    at = part.address - buf.ctypes.data
    return at if 0 <= at <= buf.size - nbytes else None


def read_checkpoint(source, *, shard: int | None = None, epoch: int | None = None,
                    filesystem: pafs.FileSystem | None = None, verify: bool = True,
                    verify_hashes: bool | None = None) -> tuple[ArenaSnapshot, CheckpointInfo]:
    """Load a checkpoint: ``source`` is a CheckpointInfo, a checkpoint directory, or (with ``shard``
    and ``epoch``) the location it was written under.

    Always checked: the manifest's own checksum, each file's size, the file's structure, and that
    the stored page hashes combine to the manifest's state hash. ``verify``: each file's CRC32C.
    ``verify_hashes`` (default: ``verify``): recompute every page's hash from its bytes and compare.
    Any mismatch raises CorruptionError naming the file (and the position and page where known).
    The snapshot's arrays are read-only views of the loaded file.
    """
    fs, dir_path = _checkpoint_location(source, shard, epoch, filesystem)
    if fs.get_file_info(_join(dir_path, MANIFEST_FILE)).type != pafs.FileType.File:
        raise FileNotFoundError(f"no complete checkpoint in {dir_path} (no {MANIFEST_FILE})")
    info = _load_info(fs, dir_path)
    if isinstance(source, CheckpointInfo) and source != info:
        raise CorruptionError("manifest changed since it was listed",
                              path=_join(dir_path, MANIFEST_FILE))
    verify_hashes = verify if verify_hashes is None else verify_hashes
    entry = next(f for f in info.files if f.name == DATA_FILE)
    path = _join(dir_path, DATA_FILE)

    buf, crc = _fetch(fs, path, entry, verify)
    try:
        snap, layout = _parse_pages(buf, path, info)
        parse_error = None
    except CorruptionError as exc:
        if not verify:
            raise
        snap, layout, parse_error = None, None, exc  # the CRC32C decides which error to give
    hashes = None
    if verify and crc is None:
        crc, hashes = _crc_and_hashes(buf, snap, layout, verify_hashes)
    if verify and crc != entry.crc32c:
        message = f"file has CRC32C {crc:08x}, the manifest says {entry.crc32c:08x}"
        located = None
        if snap is not None:  # name the damaged page where the file still parses
            if hashes is None:
                hashes = _page_hashes(snap.data, snap.starts, snap.sizes)
            located = _first_bad_page(snap, hashes, layout, path, message)
        raise located or CorruptionError(message, path=path)
    if parse_error is not None:
        raise parse_error
    if (snap.page_ids.size, snap.data.size) != (info.page_count, info.page_bytes):
        raise CorruptionError(f"pages file holds {snap.page_ids.size} pages of {snap.data.size} "
                              f"bytes, the manifest says {info.page_count} of {info.page_bytes}",
                              path=path)
    if verify_hashes:
        if hashes is None:
            hashes = _page_hashes(snap.data, snap.starts, snap.sizes)
        bad = _first_bad_page(snap, hashes, layout, path, "page hash mismatch")
        if bad is not None:
            raise bad
    else:
        hashes = snap.hashes
    state_hash = int(_cpu.combine_hashes(snap.page_ids, hashes)) if hashes.size else 0
    if state_hash != info.state_hash:
        raise CorruptionError(f"pages combine to state hash {state_hash:016x}, the manifest says "
                              f"{info.state_hash:016x}", path=_join(dir_path, MANIFEST_FILE))
    snap = ArenaSnapshot(snap.page_ids, snap.sizes, snap.versions, snap.dtypes, hashes, snap.data,
                         info.next_id)
    return snap, info


def _checkpoint_location(source, shard, epoch, filesystem) -> tuple[pafs.FileSystem, str]:
    if isinstance(source, CheckpointInfo):
        fs = filesystem or source.filesystem
        if fs is None:
            raise ValueError("this CheckpointInfo carries no filesystem; pass filesystem=")
        return fs, source.path
    fs, dir_path = _resolve(source, filesystem)
    if (shard is None) != (epoch is None):
        raise ValueError("give both shard and epoch, or neither")
    if shard is not None:
        dir_path = checkpoint_dir(dir_path, int(shard), int(epoch))
    return fs, dir_path


# ---- listing and cleanup -----------------------------------------------------------------------


def _epoch_dirs(fs, root: str, shard: int | None) -> dict[str, tuple[int, int, bool]]:
    """{checkpoint directory: (shard, epoch, has a manifest)} under ``root`` (one shard's, when
    given), from one recursive listing (one paginated LIST on an object store)."""
    base = root if shard is None else _join(root, f"shard-{int(shard):04d}")
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    prefix = root.rstrip("/") + "/"
    dirs: dict[str, tuple[int, int, bool]] = {}
    for entry in fs.get_file_info(selector):
        m = _DIR_RE.match(entry.path[len(prefix):]) if entry.path.startswith(prefix) else None
        if not m:
            continue
        d = _join(root, f"shard-{m.group(1)}", f"epoch-{m.group(2)}")
        complete = m.group(3) == MANIFEST_FILE and entry.type == pafs.FileType.File
        seen = dirs.get(d, (0, 0, False))[2]
        dirs[d] = (int(m.group(1)), int(m.group(2)), seen or complete)
    return dirs


def list_checkpoints(location, shard: int | None = None, *,
                     filesystem: pafs.FileSystem | None = None) -> list[CheckpointInfo]:
    """Complete checkpoints under ``location`` (of one shard, when given), by (epoch, shard).
    A damaged manifest raises CorruptionError rather than being skipped silently."""
    fs, root = _resolve(location, filesystem)
    dirs = _epoch_dirs(fs, root, shard)
    return [_load_info(fs, d) for d in sorted((d for d, (_, _, done) in dirs.items() if done),
                                              key=lambda d: dirs[d][1::-1])]


def latest_checkpoint(location, shard: int, at_or_before_epoch: int | None = None, *,
                      filesystem: pafs.FileSystem | None = None) -> CheckpointInfo | None:
    """The newest complete checkpoint of ``shard`` (at or before the given epoch), or None. Reads
    one manifest: a damaged one raises CorruptionError (it is not skipped for an older one)."""
    fs, root = _resolve(location, filesystem)
    epochs = {e: d for d, (_, e, done) in _epoch_dirs(fs, root, shard).items()
              if done and (at_or_before_epoch is None or e <= at_or_before_epoch)}
    return _load_info(fs, epochs[max(epochs)]) if epochs else None


def delete_checkpoint(info: CheckpointInfo, *, filesystem: pafs.FileSystem | None = None) -> None:
    """Remove a checkpoint: its manifest first (from then on it is incomplete), then the rest."""
    fs = filesystem or info.filesystem
    if fs is None:
        raise ValueError("this CheckpointInfo carries no filesystem; pass filesystem=")
    manifest = _join(info.path, MANIFEST_FILE)
    if fs.get_file_info(manifest).type == pafs.FileType.File:
        fs.delete_file(manifest)
        os_dir = _os_path(fs, info.path)
        if os_dir:
            fsync_path(os_dir, directory=True)
    if fs.get_file_info(info.path).type != pafs.FileType.NotFound:
        fs.delete_dir(info.path)


def remove_incomplete(location, shard: int | None = None, *,
                      filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Delete checkpoint directories without a manifest (left by a crashed writer); returns them.
    Only safe while no writer is writing under ``location`` (e.g. when a shard starts)."""
    fs, root = _resolve(location, filesystem)
    removed = sorted(d for d, (_, _, done) in _epoch_dirs(fs, root, shard).items() if not done)
    for d in removed:
        fs.delete_dir(d)
    return removed


# ---- background writer ---------------------------------------------------------------------------


class CheckpointWriter:
    """Writes checkpoints on one background thread, in submission order.

    ``submit`` takes a snapshot (a host copy the caller no longer mutates) and returns a Future of
    its CheckpointInfo. At most ``inflight_checkpoints_max`` checkpoints are submitted and not yet
    written; ``submit`` blocks beyond that (or raises TimeoutError after ``timeout`` seconds), which
    bounds the memory the snapshots pin. A failed write fails its future and the writer goes on.
    """

    def __init__(self, location, *, filesystem: pafs.FileSystem | None = None,
                 compression: str | None = None,
                 inflight_checkpoints_max: int | None = None):
        if inflight_checkpoints_max is None:
            inflight_checkpoints_max = limits.inflight_checkpoints_max
        if inflight_checkpoints_max < 1:
            raise ValueError("inflight_checkpoints_max must be at least 1")
        self._fs, self._root = _resolve(location, filesystem)
        self._compression = compression
        self._slots = threading.BoundedSemaphore(inflight_checkpoints_max)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mmsb-checkpoint")
        self._lock = threading.Lock()
        self._closed = False
        self._stats = {"submitted": 0, "written": 0, "failed": 0, "pending": 0,
                       "bytes_written": 0}

    def submit(self, snapshot: ArenaSnapshot, *, shard: int, epoch: int, lsn: int,
               state_hash: int, timeout: float | None = None, extra: dict | None = None,
               fill=None) -> Future:
        """``fill``: the snapshot's bytes are still being copied (see write_checkpoint).
        ``timeout``: TimeoutError when no slot frees in that time (0: do not wait)."""
        if self._closed:
            raise RuntimeError("CheckpointWriter is closed")
        _check_snapshot(snapshot, state_hash)  # a caller's mistake surfaces here, not in a future
        if not self._slots.acquire(timeout=timeout):
            raise TimeoutError(f"{self._stats['pending']} checkpoints still being written")
        with self._lock:
            self._stats["submitted"] += 1
            self._stats["pending"] += 1
        try:
            return self._pool.submit(self._write, snapshot, dict(
                shard=shard, epoch=epoch, lsn=lsn, state_hash=state_hash, extra=extra,
                fill=fill))
        except BaseException:
            with self._lock:
                self._stats["submitted"] -= 1
                self._stats["pending"] -= 1
            self._slots.release()
            raise

    def _write(self, snapshot, args) -> CheckpointInfo:
        try:
            info = write_checkpoint(snapshot, self._root, filesystem=self._fs,
                                    compression=self._compression, **args)
        except BaseException:
            with self._lock:
                self._stats["failed"] += 1
            raise
        else:
            with self._lock:
                self._stats["written"] += 1
                self._stats["bytes_written"] += info.stored_bytes
            return info
        finally:
            with self._lock:
                self._stats["pending"] -= 1
            self._slots.release()

    def statistics(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def close(self, wait: bool = True) -> None:
        """Refuse new checkpoints; with ``wait``, return once the submitted ones are written."""
        self._closed = True
        self._pool.shutdown(wait=wait)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
