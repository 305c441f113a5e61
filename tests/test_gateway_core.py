"""The gateway's pure parts, without Ray or sockets: the rate limiter (time is an argument), the
settings check, request parsing, the error mapping, and the OpenAPI document against the routes."""

import base64

import msgpack
import numpy as np
import pytest

from mmsb_dist import limits
from mmsb_dist._gateway_core import (GatewaySettings, HttpError, RateLimiter, error_status,
                                     is_loopback, parse_arrow_batch, parse_create,
                                     parse_msgpack_batch, parse_u64, parse_write,
                                     retry_after_header, wants_json)
from mmsb_dist._gateway_openapi import openapi_document, operations
from mmsb_dist.delta import DeltaBatch
from mmsb_dist.errors import (CorruptionError, EpochError, GatewayError, InvalidDeltaError,
                              SerializationError, UnknownPageError)
from mmsb_dist.formats import encode_deltas

SETTINGS = GatewaySettings(max_batch_deltas=8, max_create_pages=16, max_create_bytes=1 << 16)


def test_token_bucket_allows_the_burst_then_refuses_until_refilled():
    rl = RateLimiter(rate_per_s=10.0, burst=3)
    assert [rl.take("a", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.take("a", now=100.0)
    assert wait == pytest.approx(0.1)
    assert rl.take("b", now=100.0) == 0.0          # per client
    assert rl.take("a", now=100.05) > 0            # half a token is not enough
    assert rl.take("a", now=100.2) == 0.0          # refilled
    assert RateLimiter(0, 1).take("a", now=0.0) == 0.0   # disabled


def test_rate_limiter_memory_is_bounded():
    rl = RateLimiter(rate_per_s=1.0, burst=1, clients_max=4)
    for i in range(100):
        rl.take(f"client-{i}", now=0.0)
    assert len(rl._buckets) == 4


def test_retry_after_is_whole_seconds_and_never_zero():
    assert retry_after_header(0.001) == "1"
    assert retry_after_header(1.2) == "2"


def test_non_loopback_host_needs_a_token(monkeypatch):
    monkeypatch.delenv("MMSB_GATEWAY_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.org")
    with pytest.raises(GatewayError, match="non-loopback"):
        GatewaySettings(host="0.0.0.0").check()
    GatewaySettings(host="0.0.0.0", token="t").check()
    from mmsb_dist.gateway import start_gateway
    with pytest.raises(GatewayError, match="non-loopback"):   # refused before touching Ray
        start_gateway(host="0.0.0.0", port=0)


def test_settings_refuse_nonsense():
    with pytest.raises(GatewayError):
        GatewaySettings(max_batch_deltas=limits.batch_deltas_max + 1).check()
    with pytest.raises(GatewayError):
        GatewaySettings(port=70000).check()
    assert GatewaySettings(token="abc").fingerprint()["token"] != "abc"


def test_create_limits_are_413_and_bad_input_400():
    assert parse_create(b'{"count": 2, "size": 64}', SETTINGS) == (2, 64, "uint8")
    for body, status in [(b'{"count": 17, "size": 1}', 413), (b'{"count": 2, "size": 65536}', 413),
                         (b'{"size": 1073741825}', 413), (b'{"size": "64"}', 400),
                         (b'{"size": 64, "dtype": "object"}', 400), (b"[1]", 400),
                         (b"{not json", 400), (b'{"size": 6, "dtype": "float32"}', 422),
                         (b'{"size": true}', 400)]:
        with pytest.raises(HttpError) as err:
            parse_create(body, SETTINGS)
        assert err.value.status == status, body


def test_json_write_parses_base64_and_refuses_the_rest():
    b = parse_write(b'{"page_id": 5, "offset": 3, "data": "%s"}'
                    % base64.b64encode(b"abc"))
    assert b.delta(0) == (5, 3, b"abc", None)
    for body in [b'{"page_id": 5, "offset": 3, "data": "!!"}', b'{"page_id": -1, "offset": 0, '
                 b'"data": "YQ=="}', b'{"page_id": 5, "data": "YQ=="}']:
        with pytest.raises(HttpError) as err:
            parse_write(body)
        assert err.value.status == 400
    with pytest.raises(HttpError) as err:
        parse_write(b'{"page_id": 5, "offset": 0, "data": ""}')
    assert err.value.status == 422


def test_msgpack_batch_round_trip_and_limits():
    body = msgpack.packb({"page_ids": [1, 2], "offsets": [0, 8], "data": [b"ab", b"cd"]})
    b = parse_msgpack_batch(body, SETTINGS)
    assert [b.delta(i) for i in range(2)] == [(1, 0, b"ab", None), (2, 8, b"cd", None)]
    over = msgpack.packb({"page_ids": [1] * 9, "offsets": [0] * 9, "data": [b"a"] * 9})
    with pytest.raises(HttpError) as err:
        parse_msgpack_batch(over, SETTINGS)
    assert err.value.status == 413
    for bad in [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"page_ids": [1], "offsets": [0],
                                                               "data": ["text"]}),
                msgpack.packb({"page_ids": [-1], "offsets": [0], "data": [b"a"]}),
                msgpack.packb(msgpack.ExtType(1, b"x"))]:
        with pytest.raises(HttpError) as err:
            parse_msgpack_batch(bad, SETTINGS)
        assert err.value.status == 400
    with pytest.raises(HttpError) as err:
        parse_msgpack_batch(msgpack.packb({"page_ids": [1], "offsets": [], "data": []}), SETTINGS)
    assert err.value.status == 422


def test_arrow_batch_is_the_delta_schema_and_nothing_else():
    batch = DeltaBatch.masked_deltas([3], [4], [b"\x05"], [b"xyz"])
    got = parse_arrow_batch(encode_deltas(batch).to_pybytes(), SETTINGS)
    assert got.delta(0) == (3, 4, b"xyz", b"\x05")
    with pytest.raises(SerializationError):
        parse_arrow_batch(b"\x80\x04K\x01.", SETTINGS)   # a pickle is just bad bytes here
    big = DeltaBatch.runs(np.arange(9), np.zeros(9), np.ones((9, 4), np.uint8))
    with pytest.raises(HttpError) as err:
        parse_arrow_batch(encode_deltas(big).to_pybytes(), SETTINGS)
    assert err.value.status == 413


def test_error_mapping_keeps_type_names_and_hides_internals():
    assert error_status(UnknownPageError("no page 7", page=7))[:2] == (404, "UnknownPageError")
    assert error_status(InvalidDeltaError("bad"))[:2] == (422, "InvalidDeltaError")
    assert error_status(EpochError("never"))[:2] == (409, "EpochError")
    assert error_status(SerializationError("x"))[:2] == (400, "SerializationError")
    assert error_status(CorruptionError("disk", path="/p", position=3))[:2] == (500,
                                                                                "CorruptionError")
    status, kind, message = error_status(KeyError("secret internals"))
    assert (status, kind) == (500, "InternalError") and "secret" not in message

    class Wrapped(Exception):   # how a Ray task error carries the remote one
        cause = UnknownPageError("no page 9", page=9)
    assert error_status(Wrapped("Traceback (most recent call last): ..."))[:2] == (
        404, "UnknownPageError")
    assert "Traceback" not in error_status(Wrapped("Traceback ..."))[2]


def test_parse_u64_and_accept():
    assert parse_u64("18446744073709551615", "x") == 2 ** 64 - 1
    for bad in ["18446744073709551616", "-1", "1e3", "", "٣"]:
        with pytest.raises(HttpError):
            parse_u64(bad, "x")
    assert wants_json("application/json") and not wants_json(None)
    assert not wants_json("application/octet-stream, application/json")
    assert wants_json("text/html, application/json;q=0.9")


def test_openapi_document_names_exactly_the_served_routes():
    from mmsb_dist.gateway import build_app, routes

    doc = openapi_document(SETTINGS)
    assert doc["openapi"].startswith("3.")
    app = build_app(runtime=None, settings=SETTINGS)
    assert operations(doc) == routes(app)
    limits_in_doc = doc["paths"]["/v1/batch"]["post"]["requestBody"]["content"][
        "application/msgpack"]["schema"]["properties"]["page_ids"]["maxItems"]
    assert limits_in_doc == SETTINGS.max_batch_deltas
