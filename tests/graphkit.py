"""An in-process cluster for dependency-graph tests: several ShardEngines and the barrier driven
by the same code the Ray coordinator runs (graph.plan, graph.run_plan), without Ray; plus a plain
oracle of what every page must hold."""

from __future__ import annotations

import numpy as np

from mmsb_dist.delta import DeltaBatch
from mmsb_dist.engine import ShardEngine
from mmsb_dist.graph import (DependencyGraph, changed_pages, check_shapes, make_fn, run_plan)
from mmsb_dist.placement import shards_of

DELIVERY_ROUNDS_MAX = 10_000  # eager messages between shards settle well before this


class LocalCluster:
    def __init__(self, root, shards: int = 3, backend="numpy"):
        self.n = shards
        self.engines = [ShardEngine(root / f"shard-{i}", shard=i, backend=backend, fsync="none")
                        for i in range(shards)]
        self.graph = DependencyGraph()
        self.pending: set[int] = set()
        self.next_id = 1
        self.epoch = 0
        # None: eager messages are delivered at once, in order. A list: they are collected here
        # and delivered by deliver_some (late, in any order, as on Ray).
        self.in_flight: list | None = None

    def owner(self, page: int) -> int:
        return int(shards_of(np.array([page], np.uint64), self.n)[0])

    def create(self, n: int, size: int, dtype: str = "uint8") -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.uint64)
        self.next_id += n
        owners = shards_of(ids, self.n)
        for s in np.unique(owners):
            self.engines[s].create_pages(ids=ids[owners == s], size=size, dtype=dtype)
        return ids

    def info(self, page: int):
        return self.engines[self.owner(page)].page_info([page])[0]

    def depend(self, child: int, parents, fn) -> None:
        r = make_fn(fn)
        ps = self.graph.check_add(child, parents)
        check_shapes(r, child, self.info(child), [(p, self.info(p)) for p in ps])
        self.engines[self.owner(child)].derive(child, ps, r.encode())
        self.graph.add(child, ps)
        self.pending.add(int(child))
        self._push_watch()

    def undepend(self, child: int) -> None:
        self.engines[self.owner(child)].underive(child)
        self.graph.remove(child)
        self._push_watch()

    def _push_watch(self) -> None:
        tables = self.graph.watch_tables(self.owner)
        for s, e in enumerate(self.engines):
            e.set_watch(tables.get(s, {}))

    def write(self, page: int, offset: int, data) -> None:
        self.engines[self.owner(page)].apply(DeltaBatch.runs([page], [offset], [data]))
        self.deliver()

    def _collect(self) -> None:
        for e in self.engines:
            self.in_flight += list(e.take_outbox().items())

    def deliver_some(self, rng, n: int | None = None) -> None:
        """Deliver ``n`` (None: all, and what they cause) of the collected messages, picked at
        random."""
        for _ in range(DELIVERY_ROUNDS_MAX if n is None else n):
            self._collect()
            if not self.in_flight:
                return
            target, values = self.in_flight.pop(int(rng.integers(0, len(self.in_flight))))
            self.engines[target].remote_changed(values)
        if n is None:
            raise AssertionError("eager propagation did not settle")

    def deliver(self) -> None:
        """Carry eager cross-shard messages until none are left (or collect them: in_flight)."""
        if self.in_flight is not None:
            return self._collect()
        for _ in range(DELIVERY_ROUNDS_MAX):
            sent = False
            for e in self.engines:
                for target, values in e.take_outbox().items():
                    self.engines[target].remote_changed(values)
                    sent = True
            if not sent:
                return
        raise AssertionError("eager propagation did not settle")

    def read(self, page: int) -> np.ndarray:
        return self.engines[self.owner(page)].read(page).reshape(-1).view(np.uint8)

    def commit(self) -> int:
        reports = {s: e.changes() for s, e in enumerate(self.engines)}
        changed = changed_pages(self.graph, reports, self.owner, self.pending)
        plan = self.graph.plan(changed, self.owner)

        def fetch(wanted):
            return {p: v for o, ids in wanted.items()
                    for p, v in zip(ids, self.engines[o].read_cut(ids))}

        def recompute(tasks):
            return {s: self.engines[s].recompute(ch, rem) for s, (ch, rem) in tasks.items()}

        self.errors = run_plan(self.graph, plan, self.owner, fetch, recompute)
        self.pending.clear()
        self.epoch += 1
        self.seals = [e.seal(self.epoch) for e in self.engines]
        self.deliver()
        self.last_plan = plan
        return self.epoch

    def close(self) -> None:
        for e in self.engines:
            e.close()


# ---- the oracle ----------------------------------------------------------------------------------

def oracle_fn(fn, parents: list[np.ndarray], dtype: str) -> np.ndarray:
    """What a derived page must hold, written plainly (independent of graph.evaluate)."""
    if callable(fn):
        return np.asarray(fn(*[p.view(dtype) for p in parents]), dtype=dtype).view(np.uint8)
    kind = fn if isinstance(fn, str) else fn[0]
    if kind == "copy":
        return parents[0].copy()
    if kind == "slice":
        return parents[0][fn[1]:fn[2]].copy()
    if kind == "concat":
        return np.concatenate(parents)
    views = [p.view(dtype) for p in parents]
    out = views[0].copy()
    for v in views[1:]:
        if kind == "sum":
            out = (out + v).astype(dtype)
        elif kind == "max":
            out = np.maximum(out, v)
        elif kind == "min":
            out = np.minimum(out, v)
        elif kind == "xor":
            out = out ^ v
    return out.view(np.uint8)


class Oracle:
    """Plain page bytes; derived pages recomputed in a full topological pass at each commit."""

    def __init__(self):
        self.pages: dict[int, np.ndarray] = {}
        self.dtypes: dict[int, str] = {}
        self.fns: dict[int, tuple] = {}  # child -> (parents, fn)

    def create(self, ids, size, dtype="uint8"):
        for p in ids:
            self.pages[int(p)] = np.zeros(size, np.uint8)
            self.dtypes[int(p)] = dtype

    def write(self, page, offset, data):
        data = np.frombuffer(bytes(data), np.uint8)
        self.pages[int(page)][offset:offset + data.size] = data

    def commit(self, graph: DependencyGraph):
        every = set(graph.parents) | set(graph.children)
        for c in graph.affected(every):
            parents, fn = self.fns[c]
            self.pages[c] = oracle_fn(fn, [self.pages[p] for p in parents], self.dtypes[c])
