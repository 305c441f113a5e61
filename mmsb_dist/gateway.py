"""The HTTP gateway: an aiohttp server inside a detached Ray actor (``mmsb-gateway``).

Non-Python clients and load generators (Locust, which must not share a process with Ray) reach the
runtime through it. ``start_gateway`` creates the actor in the runtime's namespace; the actor binds
its address in its constructor (so that a gateway Ray restarts after a crash listens again on the
same port) and serves from an event loop of its own thread. Requests go straight to the shard
actors (and the coordinator for ids and epochs) as awaited Ray calls: no thread pool, no extra hop.
docs/gateway.md has the endpoints and why aiohttp-in-an-actor rather than Ray Serve (measured by
benchmarks/bench_gateway.py).

Per request, in order: rate limit (per remote address, 429 + Retry-After), bearer token (401),
body size (413), decode (JSON, msgpack or Arrow IPC of the delta schema; never pickle), batch size
(413), then the runtime call. Every error is ``{"error": {"type", "message"}}``; an mmsb error keeps
its class name (UnknownPageError -> 404, InvalidDeltaError -> 422, EpochError -> 409, ...), other
failures say "InternalError" and leave the traceback in the gateway's log.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import socket
import threading
import time

import numpy as np
import ray

from mmsb_dist import limits
from mmsb_dist._gateway_core import (ARROW, JSON, MSGPACK, RAW, GatewaySettings, HttpError,
                                     RateLimiter, error_body, error_status, media_type,
                                     parse_arrow_batch, parse_create, parse_epoch, parse_msgpack_batch,
                                     parse_u64, parse_write, retry_after_header, too_large,
                                     wants_json)
from mmsb_dist._gateway_openapi import openapi_document
from mmsb_dist.errors import EpochError, GatewayError

__all__ = ["start_gateway", "stop_gateway", "gateway_url", "GATEWAY"]

GATEWAY = "mmsb-gateway"
TOKEN_ENV = "MMSB_GATEWAY_TOKEN"

log = logging.getLogger("mmsb_dist.gateway")

# Paths served without a token: probes and the API description.
_OPEN_PATHS = frozenset({"/health", "/openapi.json"})


# ---- the runtime, asynchronously ----------------------------------------------------------------

class _Runtime:
    """What the gateway asks of the runtime, as awaitable Ray calls: a Bus's placement, batching
    and delta ids (its _parts, _stamp, _submit), without blocking the event loop."""

    def __init__(self, namespace: str):
        from mmsb_dist.runtime import Bus

        self.bus = Bus(namespace, timeout_s=limits.gateway_start_timeout_s)
        self.coordinator, self.shards, self.n = self.bus.coordinator, self.bus.shards, self.bus.n
        self._committed: set[int] = set()

    @staticmethod
    async def _call(ref, timeout_s: float = limits.gateway_call_timeout_s):
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)

    async def info(self) -> dict:
        return await self._call(self.coordinator.info.remote(), 10.0)

    async def create_pages(self, count: int, size: int, dtype: str) -> np.ndarray:
        start = await self._call(self.coordinator.allocate_ids.remote(count))
        ids, refs = self.bus._create_on_shards(start, count, size, dtype)
        await asyncio.gather(*(self._call(r) for r in refs))
        return ids

    async def write(self, batch) -> int:
        """One Arrow batch per shard, sent together; returns once every part is durable. A batch
        that spans shards is validated and applied whole on each shard, not across them."""
        batch.check()
        await asyncio.gather(*(self._call(self.bus._submit(s, self.bus._stamp(part)))
                               for s, part in self.bus._parts(batch)))
        return len(batch)

    async def read(self, page_id: int, epoch: int | None) -> np.ndarray:
        from mmsb_dist.placement import shards_of

        if epoch is not None and epoch not in self._committed:
            self._committed = set(await self._call(self.coordinator.committed.remote()))
            if epoch not in self._committed:
                raise EpochError(f"epoch {epoch} was never committed")
        ids = np.array([page_id], dtype=np.uint64)
        shard = self.shards[int(shards_of(ids, self.n)[0])]
        return (await self._call(shard.read_many.remote(ids, epoch)))[0]

    async def commit(self) -> int:
        return await self._call(self.coordinator.commit.remote())

    async def checkpoint(self) -> int:
        return await self._call(self.coordinator.checkpoint.remote())

    async def stats(self) -> dict:
        shards = await asyncio.gather(*(self._call(s.stats.remote()) for s in self.shards))
        committed = await self._call(self.coordinator.committed.remote())
        return {"shards": list(shards), "committed": sorted(int(e) for e in committed)}


# ---- metrics ---------------------------------------------------------------------------------------

class _Metrics:
    """The gateway's own counters (Prometheus client, a registry per gateway) and, at scrape
    time, the shards' statistics as gauges."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("mmsb_gateway_requests", "HTTP requests served",
                                ["method", "route", "status"], registry=r)
        self.seconds = Histogram("mmsb_gateway_request_seconds", "HTTP request latency",
                                 ["route"], registry=r,
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1,
                                          2, 5, 10))
        self.deltas = Counter("mmsb_gateway_deltas_written", "deltas acknowledged durable",
                              registry=r)
        self.shard = {name: Gauge(f"mmsb_shard_{name}", help_, ["shard"], registry=r)
                      for name, help_ in (("pages", "live pages"),
                                          ("page_bytes", "bytes of live pages"),
                                          ("arena_bytes", "arena capacity"),
                                          ("next_lsn", "next log sequence number"),
                                          ("last_sealed", "last sealed epoch"),
                                          ("open_epoch", "epoch open for writes"))}
        self.committed = Gauge("mmsb_last_committed_epoch", "last committed epoch", registry=r)

    def render(self, stats: dict) -> bytes:
        from prometheus_client import generate_latest

        for s in stats["shards"]:
            for name, gauge in self.shard.items():
                if isinstance(s.get(name), (int, float)):
                    gauge.labels(shard=str(s["shard"])).set(s[name])
        self.committed.set(max(stats["committed"], default=0))
        return generate_latest(self.registry)

    def counters(self) -> dict:
        out: dict = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    key = f"{sample.labels['method']} {sample.labels['route']}"
                    by = out.setdefault(key, {})
                    by[sample.labels["status"]] = int(sample.value)
        return out


# ---- the HTTP application ----------------------------------------------------------------------------

def _json_response(doc, status: int = 200, headers: dict | None = None):
    from aiohttp import web

    return web.Response(body=json.dumps(doc, default=_plain).encode(), status=status,
                        content_type=JSON, headers=headers)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _error_response(status: int, kind: str, message: str, headers: dict | None = None):
    from aiohttp import web

    return web.Response(body=error_body(status, kind, message), status=status, content_type=JSON,
                        headers=headers)


def _route(request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def build_app(runtime: _Runtime, settings: GatewaySettings, clock=time.monotonic):
    """The aiohttp application over ``runtime`` (anything with _Runtime's coroutines)."""
    from aiohttp import web

    limiter = RateLimiter(settings.rate_per_s, settings.rate_burst)
    metrics = _Metrics()
    inflight = asyncio.Semaphore(limits.gateway_requests_inflight_max)
    expected = f"Bearer {settings.token}".encode() if settings.token else None
    document = json.dumps(openapi_document(settings)).encode()

    @web.middleware
    async def guard(request, handler):
        t0 = time.perf_counter()
        route = _route(request)
        try:
            response = await _guarded(request, handler)
        except HttpError as exc:
            response = _error_response(exc.status, exc.kind, exc.message, exc.headers)
        except web.HTTPException as exc:  # the router's 404/405, aiohttp's own 413
            kind = {404: "NotFound", 405: "MethodNotAllowed",
                    413: "PayloadTooLarge"}.get(exc.status, "BadRequest")
            response = _error_response(exc.status, kind, exc.reason)
        except asyncio.TimeoutError:
            response = _error_response(503, "Unavailable", "the runtime did not answer within "
                                       f"limits.gateway_call_timeout_s "
                                       f"({limits.gateway_call_timeout_s:g} s)")
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            log.warning("runtime unavailable: %s", exc)
            response = _error_response(503, "Unavailable", "the runtime is not reachable "
                                       "(an actor is down or restarting); retry")
        except Exception as exc:  # noqa: BLE001 - every error becomes a JSON body
            status, kind, message = error_status(exc)
            if kind == "InternalError" or status >= 500:
                log.exception("request %s %s failed", request.method, request.path)
            response = _error_response(status, kind, message)
        metrics.requests.labels(request.method, route, str(response.status)).inc()
        metrics.seconds.labels(route).observe(time.perf_counter() - t0)
        return response

    async def _guarded(request, handler):
        if request.path != "/health":
            wait = limiter.take(request.remote or "?", clock())
            if wait > 0:
                raise HttpError(429, "RateLimited", f"over {settings.rate_per_s:g} requests/s "
                                f"(burst {settings.rate_burst}); retry in {wait:.3f} s",
                                {"Retry-After": retry_after_header(wait)})
        if expected is not None and request.path not in _OPEN_PATHS:
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                raise HttpError(401, "Unauthorized", "missing or wrong bearer token",
                                {"WWW-Authenticate": 'Bearer realm="mmsb"'})
        length = request.content_length
        if length is not None and length > settings.max_body_bytes:
            raise too_large(f"body of {length} bytes is over the gateway's max_body_bytes "
                            f"({settings.max_body_bytes})")
        async with inflight:
            return await handler(request)

    async def body(request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large(f"body is over the gateway's max_body_bytes "
                            f"({settings.max_body_bytes})") from None

    def need_type(request, *kinds: str) -> str:
        kind = media_type(request.content_type)
        if kind not in kinds:
            raise HttpError(415, "UnsupportedMediaType",
                            f"Content-Type {kind or 'missing'!r}: expected {' or '.join(kinds)}")
        return kind

    async def health(request):
        info = await runtime.info()
        return _json_response({"status": "ok", "shards": int(info["shards"]),
                               "last_committed": int(info["last_committed"])})

    async def openapi(request):
        return web.Response(body=document, content_type=JSON)

    async def prometheus(request):
        text = metrics.render(await runtime.stats())
        from prometheus_client import CONTENT_TYPE_LATEST
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def create_pages(request):
        need_type(request, JSON)
        count, size, dtype = parse_create(await body(request), settings)
        ids = await runtime.create_pages(count, size, dtype)
        return _json_response({"page_ids": ids.tolist()}, status=201)

    async def read_page(request):
        page = parse_u64(request.match_info["page_id"], "page_id")
        epoch = parse_epoch(request.query)
        data = await runtime.read(page, epoch)
        if wants_json(request.headers.get("Accept")):
            raw = data.view(np.uint8).tobytes()
            return _json_response({"page_id": page, "epoch": epoch, "size": len(raw),
                                   "dtype": data.dtype.name,
                                   "data": base64.b64encode(raw).decode()})
        return web.Response(body=data.view(np.uint8).tobytes(), content_type=RAW)

    async def write(request):
        need_type(request, JSON)
        n = await runtime.write(parse_write(await body(request)))
        metrics.deltas.inc(n)
        return _json_response({"written": n})

    async def write_batch(request):
        kind = need_type(request, MSGPACK, ARROW)
        data = await body(request)
        batch = (parse_msgpack_batch(data, settings) if kind == MSGPACK
                 else parse_arrow_batch(data, settings))
        n = await runtime.write(batch)
        metrics.deltas.inc(n)
        return _json_response({"written": n})

    async def commit(request):
        return _json_response({"epoch": int(await runtime.commit())})

    async def checkpoint(request):
        return _json_response({"epoch": int(await runtime.checkpoint())})

    async def stats(request):
        out = await runtime.stats()
        out["gateway"] = {"requests": metrics.counters(),
                          "settings": {k: v for k, v in settings.fingerprint().items()
                                       if k != "token"},
                          "authenticated": settings.token is not None}
        return _json_response(out)

    app = web.Application(middlewares=[guard], client_max_size=settings.max_body_bytes)
    app.router.add_get("/health", health)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/metrics", prometheus)
    app.router.add_post("/v1/pages", create_pages)
    app.router.add_get("/v1/pages/{page_id}", read_page)
    app.router.add_post("/v1/write", write)
    app.router.add_post("/v1/batch", write_batch)
    app.router.add_post("/v1/commit", commit)
    app.router.add_post("/v1/checkpoint", checkpoint)
    app.router.add_get("/v1/stats", stats)
    return app


def routes(app) -> set[tuple[str, str]]:
    """(METHOD, path) of every route of ``app`` (HEAD, added beside each GET, left out)."""
    return {(r.method, r.resource.canonical) for r in app.router.routes()
            if r.method not in ("HEAD", "*")}


# ---- the actor ---------------------------------------------------------------------------------------

class GatewayActor:
    """Binds and serves in its constructor (from a thread with its own event loop), so a gateway
    that Ray restarts serves again without being told to."""

    def __init__(self, namespace: str, settings: GatewaySettings):
        self.settings = settings.check()
        self.namespace = namespace
        self._bound = threading.Event()
        self._error: str | None = None
        self._port = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="mmsb-gateway")
        self._thread.start()
        if not self._bound.wait(limits.gateway_start_timeout_s):
            self._error = f"did not bind within {limits.gateway_start_timeout_s:g} s"

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        try:
            runtime = _Runtime(self.namespace)
            app = build_app(runtime, self.settings)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            self._loop.run_until_complete(runner.setup())
            sock = _listen(self.settings.host, self.settings.port)
            site = web.SockSite(runner, sock)
            self._loop.run_until_complete(site.start())
            self._port = sock.getsockname()[1]
        except Exception as exc:  # reported through url(); the caller raises GatewayError
            self._error = f"{type(exc).__name__}: {exc}"
            self._bound.set()
            return
        self._bound.set()
        self._loop.run_forever()

    def url(self) -> dict:
        return {"url": _format_url(self.settings.host, self._port) if self._port else None,
                "error": self._error, "settings": self.settings.fingerprint(),
                "pid": os.getpid()}


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), int(port)))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _format_url(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# ---- start / stop --------------------------------------------------------------------------------

def start_gateway(namespace: str = "mmsb", host: str = "127.0.0.1", port: int = 8470,
                  token: str | None = None,
                  max_body_bytes: int = limits.gateway_body_bytes_max,
                  max_batch_deltas: int = limits.gateway_batch_deltas_max,
                  rate_per_s: float = limits.gateway_rate_per_s,
                  rate_burst: int = limits.gateway_rate_burst,
                  max_create_pages: int = limits.gateway_create_pages_max,
                  max_create_bytes: int = limits.gateway_create_bytes_max) -> str:
    """Start the HTTP gateway of the runtime in ``namespace`` (started before, by ``start()`` or
    ``mmsb-dist start``) as the detached actor ``mmsb-gateway``; returns its base URL.

    ``token`` (else the environment's MMSB_GATEWAY_TOKEN): every request but /health and
    /openapi.json must carry ``Authorization: Bearer <token>``; without one the gateway listens
    only on a loopback host (GatewayError otherwise). ``port=0`` picks a free port (a restarted
    gateway then picks another: give a fixed port for a stable address). ``rate_per_s <= 0``
    turns the per-client rate limit off. A gateway already running with the same settings is
    reused; with other settings, GatewayError (stop_gateway first)."""
    token = token or os.environ.get(TOKEN_ENV) or None
    settings = GatewaySettings(host=host, port=int(port), token=token,
                               max_body_bytes=int(max_body_bytes),
                               max_batch_deltas=int(max_batch_deltas),
                               max_create_pages=int(max_create_pages),
                               max_create_bytes=int(max_create_bytes),
                               rate_per_s=float(rate_per_s), rate_burst=int(rate_burst)).check()
    if not ray.is_initialized():
        ray.init(address="auto", namespace=namespace, log_to_driver=False)
    try:
        existing = ray.get_actor(GATEWAY, namespace=namespace)
    except ValueError:
        existing = None
    if existing is not None:
        info = ray.get(existing.url.remote(), timeout=limits.gateway_start_timeout_s)
        if info["settings"] == settings.fingerprint() or (
                port == 0 and {**info["settings"], "port": 0} == settings.fingerprint()):
            return info["url"]
        raise GatewayError(f"a gateway with other settings already serves namespace "
                           f"{namespace!r} at {info['url']}: stop_gateway() first")
    actor = ray.remote(GatewayActor).options(
        name=GATEWAY, namespace=namespace, lifetime="detached", max_restarts=-1,
        max_task_retries=-1, num_cpus=0).remote(namespace, settings)
    try:
        info = ray.get(actor.url.remote(), timeout=limits.gateway_start_timeout_s)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        ray.kill(actor, no_restart=True)
        raise GatewayError(f"the gateway actor did not start: {type(exc).__name__}") from exc
    if info["error"]:
        ray.kill(actor, no_restart=True)
        raise GatewayError(f"the gateway cannot serve on {host}:{port}: {info['error']}")
    return info["url"]


def gateway_url(namespace: str = "mmsb") -> str | None:
    """The base URL of the namespace's gateway, or None when none runs."""
    try:
        actor = ray.get_actor(GATEWAY, namespace=namespace)
    except ValueError:
        return None
    return ray.get(actor.url.remote(), timeout=limits.gateway_start_timeout_s)["url"]


def stop_gateway(namespace: str = "mmsb") -> bool:
    """Stop the namespace's gateway (its socket closes with its process). True if one ran."""
    try:
        actor = ray.get_actor(GATEWAY, namespace=namespace)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True
