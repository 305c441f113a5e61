"""Locust load against the mmsb-dist HTTP gateway: a weighted mix of single JSON writes, msgpack and
Arrow batch writes, raw and JSON reads, and commits.

Run it through ``python loadtests/run.py`` (which starts a runtime and its gateway, runs Locust in a
process of its own, and then checks every acknowledged write), or by hand against a running
gateway::

    MMSB_LOAD_TOKEN=... locust -f loadtests/locustfile.py --headless -u 8 -r 4 -t 20s \
        --host http://127.0.0.1:8470

This file must never import Ray (gevent's monkey patching breaks it) and does not import mmsb_dist:
it speaks the wire formats the way any non-Python client would (JSON + base64, msgpack, and the
Arrow IPC stream of the delta schema, built here with pyarrow).

Consistency: each user owns its pages (it creates them in ``on_start``), so it knows what they must
hold: it applies every acknowledged write to a local model, and checks its reads against it
(read-your-writes). A write whose outcome is unknown (an error, or the user stopped mid-request)
puts its page "in doubt": either outcome is then acceptable. At the end every process writes its
users' models to ``MMSB_LOAD_RECORD_DIR`` for run.py's check through the Python client.

Environment (defaults in brackets): MMSB_LOAD_TOKEN [none], MMSB_LOAD_PAGES_PER_USER [16],
MMSB_LOAD_PAGE_BYTES [4096], MMSB_LOAD_WRITE_BYTES [64], MMSB_LOAD_BATCH_DELTAS [64],
MMSB_LOAD_RECORD_DIR [none: no record], MMSB_LOAD_SEED [0], MMSB_LOAD_WAIT_S [0: back to back].
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import random

import msgpack
import pyarrow as pa
from locust import FastHttpUser, between, constant, events, task

TOKEN = os.environ.get("MMSB_LOAD_TOKEN")
PAGES_PER_USER = int(os.environ.get("MMSB_LOAD_PAGES_PER_USER", "16"))
PAGE_BYTES = int(os.environ.get("MMSB_LOAD_PAGE_BYTES", "4096"))
WRITE_BYTES = int(os.environ.get("MMSB_LOAD_WRITE_BYTES", "64"))
BATCH_DELTAS = int(os.environ.get("MMSB_LOAD_BATCH_DELTAS", "64"))
RECORD_DIR = os.environ.get("MMSB_LOAD_RECORD_DIR")
SEED = int(os.environ.get("MMSB_LOAD_SEED", "0"))
WAIT_S = float(os.environ.get("MMSB_LOAD_WAIT_S", "0"))

# The delta schema of mmsb_dist/formats.py (version 1), as a non-Python client would write it.
DELTA_SCHEMA = pa.schema([pa.field("page_id", pa.uint64(), nullable=False),
                          pa.field("offset", pa.uint32(), nullable=False),
                          pa.field("payload", pa.binary(), nullable=False),
                          pa.field("mask", pa.binary(), nullable=True)],
                         metadata={b"mmsb.kind": b"delta", b"mmsb.version": b"1"})

USERS: list["PageWriter"] = []
_user_ids = itertools.count()


def arrow_body(page_ids, offsets, payloads) -> bytes:
    rb = pa.RecordBatch.from_arrays([pa.array(page_ids, pa.uint64()), pa.array(offsets, pa.uint32()),
                                     pa.array(payloads, pa.binary()),
                                     pa.nulls(len(page_ids), pa.binary())], schema=DELTA_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, DELTA_SCHEMA) as writer:
        writer.write_batch(rb)
    return sink.getvalue().to_pybytes()


class PageWriter(FastHttpUser):
    wait_time = between(0, 2 * WAIT_S) if WAIT_S > 0 else constant(0)

    def on_start(self):
        self.uid = next(_user_ids)
        self.rng = random.Random(SEED * 1_000_003 + self.uid)
        self.headers = {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}
        self.model: dict[int, bytearray] = {}
        self.doubt: dict[int, list] = {}      # page -> writes of unknown outcome
        self.acked = 0
        self.read_mismatches = 0
        USERS.append(self)
        with self.client.post("/v1/pages", json={"count": PAGES_PER_USER, "size": PAGE_BYTES},
                              headers=self.headers, name="/v1/pages",
                              catch_response=True) as r:
            if r.status_code == 201:
                self.model = {int(p): bytearray(PAGE_BYTES) for p in r.json()["page_ids"]}
            else:
                r.failure(f"create: {r.status_code} {r.text[:200]}")

    # ---- the mix --------------------------------------------------------------------------------

    def _writes(self, n: int) -> list[tuple[int, int, bytes]]:
        pages = list(self.model)
        return [(self.rng.choice(pages), self.rng.randrange(0, PAGE_BYTES - WRITE_BYTES + 1),
                 self.rng.randbytes(WRITE_BYTES)) for _ in range(n)]

    def _send(self, writes, name: str, **request):
        """POST a write request; apply it to the model when acknowledged, else mark it in doubt."""
        for p, o, d in writes:          # in doubt until acknowledged (the user may be stopped)
            self.doubt.setdefault(p, []).append((o, d))
        with self.client.post(name, headers={**self.headers, **request.pop("headers", {})},
                              name=name, catch_response=True, **request) as r:
            if r.status_code == 200 and r.json().get("written") == len(writes):
                for p, o, d in writes:
                    self.model[p][o:o + len(d)] = d
                    self.doubt[p].remove((o, d))
                    if not self.doubt[p]:
                        del self.doubt[p]
                self.acked += len(writes)
            else:
                r.failure(f"{name}: {r.status_code} {r.text[:200]}")

    @task(10)
    def write_json(self):
        if self.model:
            [(p, o, d)] = writes = self._writes(1)
            self._send(writes, "/v1/write",
                       json={"page_id": p, "offset": o, "data": base64.b64encode(d).decode()})

    @task(3)
    def write_batch_msgpack(self):
        if self.model:
            writes = self._writes(BATCH_DELTAS)
            body = msgpack.packb({"page_ids": [w[0] for w in writes],
                                  "offsets": [w[1] for w in writes],
                                  "data": [w[2] for w in writes]}, use_bin_type=True)
            self._send(writes, "/v1/batch", data=body,
                       headers={"Content-Type": "application/msgpack"})

    @task(2)
    def write_batch_arrow(self):
        if self.model:
            writes = self._writes(BATCH_DELTAS)
            body = arrow_body(*zip(*writes))
            self._send(writes, "/v1/batch", data=body,
                       headers={"Content-Type": "application/vnd.apache.arrow.stream"})

    @task(6)
    def read_raw(self):
        if self.model:
            page = self.rng.choice(list(self.model))
            with self.client.get(f"/v1/pages/{page}", headers=self.headers,
                                 name="/v1/pages/[id]", catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"read: {r.status_code} {r.text[:200]}")
                else:
                    self._check_read(page, r.content, r)

    @task(2)
    def read_json(self):
        if self.model:
            page = self.rng.choice(list(self.model))
            with self.client.get(f"/v1/pages/{page}", name="/v1/pages/[id] (json)",
                                 headers={**self.headers, "Accept": "application/json"},
                                 catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"read json: {r.status_code} {r.text[:200]}")
                else:
                    self._check_read(page, base64.b64decode(r.json()["data"]), r)

    def _check_read(self, page: int, data: bytes, r) -> None:
        """Read-your-writes: a page nobody else writes holds exactly what this user wrote."""
        if page not in self.doubt and data != self.model[page]:
            self.read_mismatches += 1
            r.failure(f"page {page} differs from this user's acknowledged writes")

    @task(1)
    def commit(self):
        with self.client.post("/v1/commit", headers=self.headers, name="/v1/commit",
                              catch_response=True) as r:
            # Two commits at once: the coordinator serializes them; an aborted attempt would be
            # a 409 EpochError (a shard timed out) and counts as a failure of the run.
            if r.status_code != 200:
                r.failure(f"commit: {r.status_code} {r.text[:200]}")


def _record(environment, **_kw) -> None:
    if not RECORD_DIR:
        return
    os.makedirs(RECORD_DIR, exist_ok=True)
    doc = {"users": [{"uid": u.uid, "acked_writes": u.acked, "read_mismatches": u.read_mismatches,
                      "pages": {str(p): base64.b64encode(bytes(m)).decode()
                                for p, m in u.model.items()},
                      "doubt": {str(p): [[o, base64.b64encode(d).decode()] for o, d in ws]
                                for p, ws in u.doubt.items()}}
                     for u in USERS]}
    path = os.path.join(RECORD_DIR, f"acked-{os.getpid()}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(doc, fh)
    os.replace(path + ".tmp", path)


events.test_stop.add_listener(_record)
events.quitting.add_listener(_record)
