"""The HTTP gateway's pure parts: its settings, the per-client rate limiter, request parsing and the
mapping of errors to HTTP statuses. No Ray, no sockets and no clock: time is an argument.

Nothing that arrives from the network is unpickled: JSON (``json``), msgpack (``msgpack`` with
``strict_map_key`` and no ext hooks) and Arrow IPC (``formats.decode_deltas``, which refuses any
schema but the delta schema) are the only decoders.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import ipaddress
import json
import math
from collections import OrderedDict

import msgpack
import numpy as np

from mmsb_dist import limits
from mmsb_dist.arena import DTYPES
from mmsb_dist.delta import DeltaBatch
from mmsb_dist.errors import (CapacityError, CorruptionError, EpochError, GatewayError,
                              GraphCycleError, InvalidDeltaError, InvalidPageError, LogError,
                              MmsbError, SerializationError, UnknownPageError)

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

JSON = "application/json"
MSGPACK = "application/msgpack"
ARROW = "application/vnd.apache.arrow.stream"
RAW = "application/octet-stream"


# ---- settings -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GatewaySettings:
    """What a gateway serves with. ``token`` None: no authentication (loopback only)."""

    host: str = "127.0.0.1"
    port: int = 8470
    token: str | None = None
    max_body_bytes: int = limits.gateway_body_bytes_max
    max_batch_deltas: int = limits.gateway_batch_deltas_max
    max_create_pages: int = limits.gateway_create_pages_max
    max_create_bytes: int = limits.gateway_create_bytes_max
    rate_per_s: float = limits.gateway_rate_per_s
    rate_burst: int = limits.gateway_rate_burst

    def check(self) -> "GatewaySettings":
        """Refuse what must not run; GatewayError names the setting."""
        if not self.token and not is_loopback(self.host):
            raise GatewayError(f"refusing to listen on non-loopback host {self.host!r} without a "
                               "token: pass token=... or set MMSB_GATEWAY_TOKEN")
        if not 0 <= int(self.port) <= 65535:
            raise GatewayError(f"port {self.port} is not a TCP port")
        for name in ("max_body_bytes", "max_batch_deltas", "max_create_pages", "max_create_bytes"):
            if int(getattr(self, name)) < 1:
                raise GatewayError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.max_batch_deltas > limits.batch_deltas_max:
            raise GatewayError(f"max_batch_deltas={self.max_batch_deltas} is over "
                               f"limits.batch_deltas_max ({limits.batch_deltas_max})")
        if self.rate_per_s > 0 and self.rate_burst < 1:
            raise GatewayError(f"rate_burst={self.rate_burst}: must be at least 1 when rate_per_s "
                               "is set")
        return self

    def fingerprint(self) -> dict:
        """The settings without the secret (the token as a hash): to compare two gateways."""
        out = dataclasses.asdict(self)
        out["token"] = (hashlib.sha256(self.token.encode()).hexdigest() if self.token else None)
        return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


# ---- rate limit ---------------------------------------------------------------------------------

class RateLimiter:
    """A token bucket per client: ``rate_per_s`` tokens a second, at most ``burst`` saved. Remembers
    at most ``clients_max`` clients (least recently seen forgotten: it starts again full).
    ``rate_per_s <= 0`` disables it."""

    def __init__(self, rate_per_s: float, burst: int,
                 clients_max: int = limits.gateway_rate_clients_max):
        self.rate, self.burst, self.clients_max = float(rate_per_s), float(burst), clients_max
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, t)

    def take(self, key: str, now: float) -> float:
        """0.0 when ``key`` may go now (one token taken), else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.clients_max:
            self._buckets.popitem(last=False)
        return wait


def retry_after_header(wait_s: float) -> str:
    """Retry-After takes whole seconds: round up, and never say 0."""
    return str(max(1, math.ceil(wait_s)))


# ---- errors --------------------------------------------------------------------------------------

class HttpError(Exception):
    """A request the gateway refuses before it reaches a shard: status, type and message."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.headers = headers or {}


def bad_request(message: str) -> HttpError:
    return HttpError(400, "BadRequest", message)


def too_large(message: str) -> HttpError:
    return HttpError(413, "PayloadTooLarge", message)


# Most specific first: CorruptionError is a SerializationError, but a client did not send it.
_STATUS = [
    (UnknownPageError, 404),
    (CorruptionError, 500),
    (SerializationError, 400),
    (InvalidDeltaError, 422),
    (InvalidPageError, 422),
    (CapacityError, 507),
    (EpochError, 409),
    (GraphCycleError, 409),
    (LogError, 503),
    (MmsbError, 500),
]


def error_status(exc: BaseException) -> tuple[int, str, str]:
    """(status, type, message) of an error, for the JSON body ``{"error": {"type", "message"}}``.
    An mmsb error keeps its class name and its own message (it names page, offset and length and
    never carries a traceback); anything else is an internal error whose details stay in the
    gateway's log."""
    if isinstance(exc, HttpError):
        return exc.status, exc.kind, exc.message
    cause = mmsb_cause(exc)
    if cause is not None:
        status = next(code for cls, code in _STATUS if isinstance(cause, cls))
        return status, type(cause).__name__, str(cause.args[0]) if cause.args else type(cause).__name__
    return 500, "InternalError", "internal error (details are in the gateway's log)"


def mmsb_cause(exc: BaseException) -> MmsbError | None:
    """The mmsb error behind ``exc``: itself, or the cause a Ray task error wraps (Ray re-raises a
    remote error as a subclass of both RayTaskError and the original class; its ``cause`` is the
    original, whose message has no remote traceback in it)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MmsbError):
        return cause
    return exc if isinstance(exc, MmsbError) else None


def error_body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"error": {"type": kind, "message": message}}).encode()


# ---- request parsing -----------------------------------------------------------------------------

def parse_json(body: bytes) -> dict:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad_request(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise bad_request("body must be a JSON object")
    return doc


def want_int(doc: dict, key: str, lo: int, hi: int, default=None) -> int:
    value = doc.get(key, default)
    if value is None:
        raise bad_request(f"{key!r} is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key!r} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise bad_request(f"{key!r}={value} is outside [{lo}, {hi}]")
    return value


def parse_u64(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise bad_request(f"{what} must be an unsigned integer, got {text[:40]!r}")
    value = int(text)
    if value > U64_MAX:
        raise bad_request(f"{what}={value} is over 2^64-1")
    return value


def parse_epoch(query) -> int | None:
    text = query.get("epoch")
    if text is None:
        return None
    epoch = parse_u64(text, "epoch")
    if epoch < 1:
        raise bad_request("epoch must be at least 1 (epochs are numbered from 1)")
    return epoch


def parse_create(body: bytes, settings: GatewaySettings) -> tuple[int, int, str]:
    """(count, size, dtype) of a page-create request, within the gateway's limits."""
    doc = parse_json(body)
    count = want_int(doc, "count", 1, U64_MAX, default=1)
    size = want_int(doc, "size", 1, U64_MAX)
    dtype = doc.get("dtype", "uint8")
    if dtype not in DTYPES:
        raise bad_request(f"dtype {str(dtype)[:40]!r} is not one of {', '.join(DTYPES)}")
    if size > limits.page_bytes_max:
        raise too_large(f"size={size} is over limits.page_bytes_max ({limits.page_bytes_max})")
    if count > settings.max_create_pages:
        raise too_large(f"count={count} is over the gateway's max_create_pages "
                        f"({settings.max_create_pages})")
    if count * size > settings.max_create_bytes:
        raise too_large(f"count x size = {count * size} bytes is over the gateway's "
                        f"max_create_bytes ({settings.max_create_bytes})")
    if size % np.dtype(dtype).itemsize:
        raise HttpError(422, "InvalidPageError",
                        f"size={size} is not a multiple of {dtype}'s {np.dtype(dtype).itemsize} "
                        "bytes")
    return count, size, dtype


def _b64(text, what: str) -> bytes:
    if not isinstance(text, str):
        raise bad_request(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{what} is not base64: {exc}") from None


def parse_write(body: bytes) -> DeltaBatch:
    """One run from ``{"page_id", "offset", "data": base64}``."""
    doc = parse_json(body)
    page = want_int(doc, "page_id", 0, U64_MAX)
    offset = want_int(doc, "offset", 0, limits.page_bytes_max - 1)
    data = _b64(doc.get("data"), "'data'")
    if not data:
        raise HttpError(422, "InvalidDeltaError", "'data' is empty: a write needs at least one "
                                                  "byte")
    return DeltaBatch.runs([page], [offset], [data])


def parse_msgpack_batch(body: bytes, settings: GatewaySettings) -> DeltaBatch:
    """Runs from a msgpack map ``{"page_ids": [u64...], "offsets": [u32...], "data": [bin...]}``."""
    try:
        # No ext hook, no object hook: plain maps, arrays, ints and bytes only. The length caps
        # stop a small body from declaring a huge container before it is read.
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True,
                              max_array_len=settings.max_batch_deltas + 1, max_map_len=16,
                              max_str_len=1024, max_ext_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as exc:
        raise HttpError(400, "SerializationError", f"body is not msgpack: {exc}") from None
    if not isinstance(doc, dict):
        raise HttpError(400, "SerializationError", "msgpack body must be a map")
    cols = {}
    for key in ("page_ids", "offsets", "data"):
        col = doc.get(key)
        if not isinstance(col, list):
            raise HttpError(400, "SerializationError", f"{key!r} must be an array")
        cols[key] = col
    n = len(cols["page_ids"])
    if n > settings.max_batch_deltas:
        raise too_large(f"batch of {n} deltas is over the gateway's max_batch_deltas "
                        f"({settings.max_batch_deltas})")
    if len(cols["offsets"]) != n or len(cols["data"]) != n:
        raise HttpError(422, "InvalidDeltaError",
                        f"{n} page_ids, {len(cols['offsets'])} offsets and {len(cols['data'])} "
                        "data items: the three arrays must have one item per delta")
    if n == 0:
        raise HttpError(422, "InvalidDeltaError", "empty batch: a batch needs at least one delta")
    ids = _int_column(cols["page_ids"], "page_ids", U64_MAX, np.uint64)
    offsets = _int_column(cols["offsets"], "offsets", U32_MAX, np.int64)
    if not all(isinstance(d, bytes) for d in cols["data"]):
        raise HttpError(400, "SerializationError", "every 'data' item must be msgpack bin")
    return DeltaBatch.runs(ids, offsets, cols["data"])


def _int_column(values: list, what: str, hi: int, dtype) -> np.ndarray:
    if not all(type(v) is int and 0 <= v <= hi for v in values):
        raise HttpError(400, "SerializationError", f"every {what!r} item must be an integer in "
                                                   f"[0, {hi}]")
    return np.array(values, dtype=dtype)


def parse_arrow_batch(body: bytes, settings: GatewaySettings) -> DeltaBatch:
    """A delta batch in the Arrow IPC stream format of ``formats.encode_deltas``: runs and masked
    deltas. Its own delta id is ignored (the gateway numbers what it forwards)."""
    from mmsb_dist.formats import decode_deltas

    batch = decode_deltas(body)  # SerializationError (400) / InvalidDeltaError (422)
    if len(batch) > settings.max_batch_deltas:
        raise too_large(f"batch of {len(batch)} deltas is over the gateway's max_batch_deltas "
                        f"({settings.max_batch_deltas})")
    return batch


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def wants_json(accept: str | None) -> bool:
    """Content negotiation for reads: JSON only when asked for and raw bytes not preferred."""
    kinds = [media_type(part) for part in (accept or "").split(",")]
    return JSON in kinds and (RAW not in kinds or kinds.index(JSON) < kinds.index(RAW))
