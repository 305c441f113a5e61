"""The Ray Serve + FastAPI alternative to the gateway, for benchmarks/bench_gateway.py: one route
doing exactly what the gateway's single write does (parse JSON, build and encode the batch, await
the shard's apply). Kept in its own module without ``from __future__ import annotations``: FastAPI
resolves the handler's annotations at import, and Serve pickles the app."""

import base64
import json
import secrets

import ray
from fastapi import FastAPI, Request
from ray import serve

from mmsb_dist.delta import DeltaBatch
from mmsb_dist.formats import encode_deltas

app = FastAPI()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class ServeWriter:
    def __init__(self, namespace: str):
        from mmsb_dist.runtime import _shard_name

        self.shard = ray.get_actor(_shard_name(0), namespace=namespace)
        self.client_id, self.seq = secrets.randbits(63) | 1, 0

    @app.post("/v1/write")
    async def write(self, request: Request):
        doc = json.loads(await request.body())
        self.seq += 1
        batch = DeltaBatch.runs([doc["page_id"]], [doc["offset"]], [base64.b64decode(doc["data"])],
                                client_id=self.client_id, seq=self.seq)
        await self.shard.apply.remote(encode_deltas(batch).to_pybytes())
        return {"written": 1}
