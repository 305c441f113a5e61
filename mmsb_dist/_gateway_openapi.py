"""The gateway's OpenAPI 3 document, built from its settings (limits appear as maximums).

Written by hand next to the routes in mmsb_dist/gateway.py; tests/test_gateway.py checks that both
name the same operations, and tests/test_gateway_schema.py runs Schemathesis against it.
"""

from __future__ import annotations

from mmsb_dist import __version__, limits
from mmsb_dist._gateway_core import ARROW, JSON, MSGPACK, RAW, U32_MAX, U64_MAX, GatewaySettings
from mmsb_dist.arena import DTYPES

_ERROR = {"$ref": "#/components/schemas/Error"}
_U64 = {"type": "integer", "minimum": 0, "maximum": U64_MAX}


def _errors(*codes: int) -> dict:
    text = {400: "malformed request", 401: "missing or wrong bearer token",
            404: "no such page", 409: "epoch conflict (never committed, aborted, nothing to "
                                      "checkpoint)",
            413: "over a size limit of the gateway", 415: "unsupported Content-Type",
            422: "well-formed but invalid (out of the page's bounds, empty)",
            429: "over the client's rate (see Retry-After)",
            503: "the runtime is not reachable"}
    out = {str(c): {"description": text[c], "content": {JSON: {"schema": _ERROR}}}
           for c in codes}
    if 429 in codes:
        out["429"]["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                                 "description": "seconds"}}
    return out


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {JSON: {"schema": schema}}}


# Any route: its body is bounded (413) before it is read, whatever the route.
_COMMON = (400, 401, 413, 429, 503)


def openapi_document(settings: GatewaySettings) -> dict:
    s = settings
    epoch_param = {"name": "epoch", "in": "query", "required": False,
                   "description": "read as of this committed epoch (time travel)",
                   "schema": {"type": "integer", "minimum": 1, "maximum": U64_MAX}}
    page_param = {"name": "page_id", "in": "path", "required": True, "schema": _U64}
    epoch_result = {"type": "object", "required": ["epoch"],
                    "properties": {"epoch": {"type": "integer", "minimum": 1}}}
    written = {"type": "object", "required": ["written"],
               "properties": {"written": {"type": "integer", "minimum": 1}}}
    batch_schema = {
        "type": "object", "required": ["page_ids", "offsets", "data"],
        "properties": {
            "page_ids": {"type": "array", "items": _U64, "maxItems": s.max_batch_deltas},
            "offsets": {"type": "array", "maxItems": s.max_batch_deltas,
                        "items": {"type": "integer", "minimum": 0, "maximum": U32_MAX}},
            "data": {"type": "array", "maxItems": s.max_batch_deltas,
                     "items": {"type": "string", "format": "binary"}},
        }}
    paths = {
        "/health": {"get": {
            "operationId": "health", "summary": "liveness and the runtime's shape",
            "security": [],
            "responses": {"200": _json({"$ref": "#/components/schemas/Health"}, "serving"),
                          **_errors(429, 503)}}},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "this document", "security": [],
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3 document")}}},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus text exposition",
            "responses": {"200": {"description": "metrics", "content": {
                "text/plain": {"schema": {"type": "string"}}}}, **_errors(*_COMMON)}}},
        "/v1/pages": {"post": {
            "operationId": "createPages", "summary": "create zeroed pages",
            "requestBody": {"required": True, "content": {JSON: {"schema": {
                "type": "object", "required": ["size"],
                "properties": {
                    "count": {"type": "integer", "minimum": 1, "maximum": s.max_create_pages,
                              "default": 1},
                    "size": {"type": "integer", "minimum": 1, "maximum": limits.page_bytes_max},
                    "dtype": {"type": "string", "enum": list(DTYPES), "default": "uint8"}}}}}},
            "responses": {"201": _json({"type": "object", "required": ["page_ids"],
                                        "properties": {"page_ids": {"type": "array",
                                                                    "items": _U64}}},
                                       "the new pages' ids"),
                          **_errors(*_COMMON, 415, 422)}}},
        "/v1/pages/{page_id}": {"get": {
            "operationId": "readPage",
            "summary": "read a page: raw bytes, or JSON with Accept: application/json",
            "parameters": [page_param, epoch_param],
            "responses": {"200": {"description": "the page's bytes", "content": {
                RAW: {"schema": {"type": "string", "format": "binary"}},
                JSON: {"schema": {"$ref": "#/components/schemas/Page"}}}},
                **_errors(*_COMMON, 404, 409)}}},
        "/v1/write": {"post": {
            "operationId": "write", "summary": "one durable write (a run of bytes)",
            "requestBody": {"required": True, "content": {JSON: {"schema": {
                "type": "object", "required": ["page_id", "offset", "data"],
                "properties": {"page_id": _U64,
                               "offset": {"type": "integer", "minimum": 0,
                                          "maximum": limits.page_bytes_max - 1},
                               "data": {"type": "string", "format": "byte",
                                        "description": "base64"}}}}}},
            "responses": {"200": _json(written, "durable"),
                          **_errors(*_COMMON, 404, 415, 422)}}},
        "/v1/batch": {"post": {
            "operationId": "writeBatch",
            "summary": "a batch of durable writes: msgpack columns, or an Arrow IPC stream of the "
                       "delta schema (runs and masked deltas)",
            "requestBody": {"required": True, "content": {
                MSGPACK: {"schema": batch_schema},
                ARROW: {"schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": _json(written, "durable"),
                          **_errors(*_COMMON, 404, 415, 422)}}},
        "/v1/commit": {"post": {
            "operationId": "commit", "summary": "close the open epoch on every shard",
            "responses": {"200": _json(epoch_result, "committed"),
                          **_errors(*_COMMON, 409)}}},
        "/v1/checkpoint": {"post": {
            "operationId": "checkpoint",
            "summary": "every shard snapshots the last committed epoch",
            "responses": {"200": _json(epoch_result, "checkpointed"),
                          **_errors(*_COMMON, 409)}}},
        "/v1/stats": {"get": {
            "operationId": "stats", "summary": "shards, committed epochs, gateway counters",
            "responses": {"200": _json({"type": "object",
                                        "required": ["shards", "committed", "gateway"]},
                                       "statistics"),
                          **_errors(*_COMMON)}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "mmsb-dist gateway", "version": __version__,
                 "description": "HTTP ingress of an mmsb-dist runtime. Every write is durable "
                                "when acknowledged. Errors: {\"error\": {\"type\", \"message\"}} "
                                "with mmsb_dist's error class names."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["type", "message"],
                    "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}},
                "Health": {"type": "object", "required": ["status", "shards"],
                           "properties": {"status": {"type": "string", "enum": ["ok"]},
                                          "shards": {"type": "integer", "minimum": 1},
                                          "last_committed": {"type": "integer", "minimum": 0}}},
                "Page": {"type": "object",
                         "required": ["page_id", "size", "dtype", "data"],
                         "properties": {"page_id": _U64,
                                        "epoch": {"type": "integer", "minimum": 1,
                                                  "nullable": True},
                                        "size": {"type": "integer", "minimum": 1},
                                        "dtype": {"type": "string", "enum": list(DTYPES)},
                                        "data": {"type": "string", "format": "byte"}}},
            },
        },
    }


def operations(doc: dict) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in ``doc``."""
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
