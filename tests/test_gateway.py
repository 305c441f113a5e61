"""The HTTP gateway on a real local Ray runtime (one per module): round trips of JSON, msgpack and
Arrow writes and raw/JSON reads, 401 without the token, 413 over the limits, 429 over the rate,
JSON errors without tracebacks, and a Schemathesis run of the OpenAPI document (no 5xx)."""

import base64

import msgpack
import numpy as np
import pytest
import ray
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from _raykit import wait_until
from mmsb_dist import runtime
from mmsb_dist.delta import DeltaBatch
from mmsb_dist.errors import GatewayError
from mmsb_dist.formats import encode_deltas
from mmsb_dist.gateway import GATEWAY, gateway_url, start_gateway, stop_gateway

NS = "mmsb-gw-test"
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ARROW = "application/vnd.apache.arrow.stream"
MSGPACK = "application/msgpack"
LIMITS = dict(max_body_bytes=64 << 10, max_batch_deltas=256, max_create_pages=64,
              max_create_bytes=1 << 20, rate_per_s=10_000.0, rate_burst=10_000)
TIMEOUT_S = 60   # any one HTTP call (a bound, never asserted on)


@pytest.fixture(scope="module")
def bus(tmp_path_factory):
    ray.init(num_cpus=3, include_dashboard=False, namespace=NS, log_to_driver=False)
    b = runtime.start(shards=2, data_dir=str(tmp_path_factory.mktemp("gateway")), namespace=NS,
                      config={"backend": "numpy"})
    yield b
    stop_gateway(NS)
    runtime.stop(namespace=NS)
    ray.shutdown()


@pytest.fixture(scope="module")
def url(bus):
    return start_gateway(namespace=NS, port=0, token=TOKEN, **LIMITS)


@pytest.fixture
def http():
    with requests.Session() as s:
        s.headers.update(AUTH)
        yield s


def _post(http, url, path, **kw):
    return http.post(url + path, timeout=TIMEOUT_S, **kw)


def _pages(http, url, n=4, size=4096):
    r = _post(http, url, "/v1/pages", json={"count": n, "size": size})
    assert r.status_code == 201, r.text
    return r.json()["page_ids"]


def _error(r, status, kind):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and "Traceback" not in err["message"]
    return err


def test_json_write_then_raw_and_json_reads(bus, url, http):
    ids = _pages(http, url)
    r = _post(http, url, "/v1/write", json={"page_id": ids[1], "offset": 100,
                                            "data": base64.b64encode(b"hello gateway").decode()})
    assert r.status_code == 200 and r.json() == {"written": 1}
    raw = http.get(f"{url}/v1/pages/{ids[1]}", timeout=TIMEOUT_S)
    assert raw.headers["Content-Type"].startswith("application/octet-stream")
    assert raw.content[100:113] == b"hello gateway" and len(raw.content) == 4096
    doc = http.get(f"{url}/v1/pages/{ids[1]}", headers={"Accept": "application/json"},
                   timeout=TIMEOUT_S).json()
    assert base64.b64decode(doc["data"]) == raw.content and doc["dtype"] == "uint8"
    assert bytes(bus.read(ids[1])) == raw.content        # the Python client sees the same bytes


def test_msgpack_and_arrow_batches_round_trip_across_shards(bus, url, http):
    ids = _pages(http, url, n=16, size=256)
    rng = np.random.default_rng(7)
    model = {p: np.zeros(256, np.uint8) for p in ids}
    offs = rng.integers(0, 256 - 8, len(ids)).tolist()
    data = [rng.integers(1, 256, 8, dtype=np.uint8).tobytes() for _ in ids]
    r = _post(http, url, "/v1/batch", headers={"Content-Type": MSGPACK},
              data=msgpack.packb({"page_ids": ids, "offsets": offs, "data": data}))
    assert r.status_code == 200 and r.json() == {"written": 16}, r.text
    for p, o, d in zip(ids, offs, data):
        model[p][o:o + 8] = np.frombuffer(d, np.uint8)
    # Arrow: runs and a masked delta in one batch (bit i of the mask selects byte i).
    runs = DeltaBatch.runs(ids[:3], [0, 10, 20], [b"AAAA", b"BBBB", b"CCCC"])
    masked = DeltaBatch.masked_deltas([ids[3]], [40], [bytes([0b0101])], [b"wxyz"])
    body = encode_deltas(DeltaBatch.concat([runs, masked])).to_pybytes()
    r = _post(http, url, "/v1/batch", headers={"Content-Type": ARROW}, data=body)
    assert r.status_code == 200 and r.json() == {"written": 4}, r.text
    for p, o, d in zip(ids[:3], [0, 10, 20], [b"AAAA", b"BBBB", b"CCCC"]):
        model[p][o:o + 4] = np.frombuffer(d, np.uint8)
    model[ids[3]][40] = ord("w")
    model[ids[3]][42] = ord("y")
    assert {s["shard"] for s in bus.stats()["shards"] if s["pages"]} == {0, 1}
    for p, got in zip(ids, bus.read_many(ids)):
        assert np.array_equal(got, model[p]), p


def test_commit_checkpoint_and_time_travel_reads(bus, url, http):
    ids = _pages(http, url, n=1, size=64)
    write = {"page_id": ids[0], "offset": 0, "data": base64.b64encode(b"one").decode()}
    assert _post(http, url, "/v1/write", json=write).status_code == 200
    epoch = _post(http, url, "/v1/commit").json()["epoch"]
    assert _post(http, url, "/v1/checkpoint").json() == {"epoch": epoch}
    write["data"] = base64.b64encode(b"two").decode()
    assert _post(http, url, "/v1/write", json=write).status_code == 200
    old = http.get(f"{url}/v1/pages/{ids[0]}?epoch={epoch}", timeout=TIMEOUT_S)
    assert old.content[:3] == b"one"
    assert http.get(f"{url}/v1/pages/{ids[0]}", timeout=TIMEOUT_S).content[:3] == b"two"
    _error(http.get(f"{url}/v1/pages/{ids[0]}?epoch={epoch + 1000}", timeout=TIMEOUT_S),
           409, "EpochError")
    stats = http.get(f"{url}/v1/stats", timeout=TIMEOUT_S).json()
    assert epoch in stats["committed"] and len(stats["shards"]) == 2
    metrics = http.get(f"{url}/metrics", timeout=TIMEOUT_S)
    assert metrics.status_code == 200 and "mmsb_gateway_requests_total" in metrics.text
    assert f"mmsb_last_committed_epoch {float(epoch)}" in metrics.text


def test_errors_are_typed_json(url, http):
    ids = _pages(http, url, n=1, size=64)
    _error(http.get(f"{url}/v1/pages/123456789", timeout=TIMEOUT_S), 404, "UnknownPageError")
    _error(_post(http, url, "/v1/write", json={"page_id": ids[0], "offset": 60,
                                               "data": base64.b64encode(b"too long").decode()}),
           422, "InvalidDeltaError")
    _error(_post(http, url, "/v1/batch", headers={"Content-Type": ARROW}, data=b"not arrow"),
           400, "SerializationError")
    _error(_post(http, url, "/v1/batch", headers={"Content-Type": "text/plain"}, data=b"x"),
           415, "UnsupportedMediaType")
    _error(_post(http, url, "/v1/write", data=b"{", headers={"Content-Type": "application/json"}),
           400, "BadRequest")
    _error(http.get(f"{url}/v2/nothing", timeout=TIMEOUT_S), 404, "NotFound")


def test_401_without_or_with_a_wrong_token(url):
    assert requests.get(f"{url}/health", timeout=TIMEOUT_S).status_code == 200   # probes: open
    r = requests.post(f"{url}/v1/commit", timeout=TIMEOUT_S)
    _error(r, 401, "Unauthorized")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    _error(requests.get(f"{url}/v1/stats", headers={"Authorization": "Bearer nope"},
                        timeout=TIMEOUT_S), 401, "Unauthorized")
    _error(requests.get(f"{url}/metrics", timeout=TIMEOUT_S), 401, "Unauthorized")


def test_413_over_the_body_batch_and_create_limits(url, http):
    ids = _pages(http, url, n=1, size=4096)
    big = {"page_id": ids[0], "offset": 0,
           "data": base64.b64encode(bytes(LIMITS["max_body_bytes"])).decode()}
    _error(_post(http, url, "/v1/write", json=big), 413, "PayloadTooLarge")
    n = LIMITS["max_batch_deltas"] + 1
    over = msgpack.packb({"page_ids": [ids[0]] * n, "offsets": [0] * n, "data": [b"x"] * n})
    _error(_post(http, url, "/v1/batch", headers={"Content-Type": MSGPACK}, data=over),
           413, "PayloadTooLarge")
    arrow = encode_deltas(DeltaBatch.runs([ids[0]] * n, np.zeros(n), np.ones((n, 1), np.uint8)))
    _error(_post(http, url, "/v1/batch", headers={"Content-Type": ARROW},
                 data=arrow.to_pybytes()), 413, "PayloadTooLarge")
    _error(_post(http, url, "/v1/pages", json={"count": 64, "size": 1 << 20}), 413,
           "PayloadTooLarge")
    # Nothing of the refused batches was applied.
    assert http.get(f"{url}/v1/pages/{ids[0]}", timeout=TIMEOUT_S).content == bytes(4096)


def test_429_over_the_rate_with_retry_after(bus, url, monkeypatch):
    # A second gateway cannot share the namespace: swap in a slow one, token from the environment.
    stop_gateway(NS)
    monkeypatch.setenv("MMSB_GATEWAY_TOKEN", "from-env")
    try:
        slow = start_gateway(namespace=NS, port=0, rate_per_s=0.01, rate_burst=2)
        with pytest.raises(GatewayError, match="other settings"):
            start_gateway(namespace=NS, port=0, rate_per_s=5.0, rate_burst=2)
        assert gateway_url(NS) == slow
        hdr = {"Authorization": "Bearer from-env"}
        codes = [requests.get(f"{slow}/v1/stats", headers=hdr, timeout=TIMEOUT_S).status_code
                 for _ in range(2)]
        assert codes == [200, 200]
        r = requests.get(f"{slow}/v1/stats", headers=hdr, timeout=TIMEOUT_S)
        _error(r, 429, "RateLimited")
        assert int(r.headers["Retry-After"]) >= 1
        assert requests.get(f"{slow}/health", timeout=TIMEOUT_S).status_code == 200  # not limited
    finally:
        stop_gateway(NS)
        monkeypatch.delenv("MMSB_GATEWAY_TOKEN")
        assert start_gateway(namespace=NS, port=int(url.rsplit(":", 1)[1]), token=TOKEN,
                             **LIMITS) == url


def test_gateway_restarted_by_ray_serves_again(url, http):
    actor = ray.get_actor(GATEWAY, namespace=NS)
    pid = ray.get(actor.url.remote())["pid"]
    ray.kill(actor, no_restart=False)   # Ray restarts it; its constructor binds the same port
    info = wait_until(lambda: (i := ray.get(actor.url.remote(), timeout=TIMEOUT_S))["pid"] != pid
                      and i, timeout_s=TIMEOUT_S, what="gateway restarted")
    assert info["url"] == url and info["error"] is None
    assert http.get(f"{url}/v1/stats", timeout=TIMEOUT_S).status_code == 200


# ---- Schemathesis: generated requests from the OpenAPI document find no 5xx -------------------------

def _packable(value):
    # Negative cases hold integers msgpack has no encoding for: send them as floats (still wrong).
    if isinstance(value, dict):
        return {k: _packable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_packable(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**64:
        return float(value)
    return value


@schemathesis.serializer(MSGPACK)
def _to_msgpack(ctx, value):
    return msgpack.packb(_packable(value), use_bin_type=True)


_deltas = st.lists(st.tuples(st.integers(0, 64), st.integers(0, 300), st.binary(min_size=1,
                                                                                  max_size=32)),
                   min_size=1, max_size=8)
schemathesis.openapi.media_type(ARROW, st.one_of(
    st.binary(max_size=256),
    _deltas.map(lambda ds: encode_deltas(DeltaBatch.runs([d[0] for d in ds], [d[1] for d in ds],
                                                         [d[2] for d in ds])).to_pybytes())))


@pytest.fixture
def api_schema(url):
    return schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=TIMEOUT_S)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_openapi_property_no_server_errors(case, url):
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance,
                                                   response_schema_conformance,
                                                   status_code_conformance)

    case.call_and_validate(base_url=url, headers=AUTH, timeout=TIMEOUT_S,
                           checks=[not_a_server_error, status_code_conformance,
                                   content_type_conformance, response_schema_conformance])
