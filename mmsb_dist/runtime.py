"""The runtime on Ray: shard actors, the coordinator actor, and the client (``Bus``).

- **Shard actors** (``mmsb-shard-<i>``, detached, restarted by Ray without limit) each wrap a
  ShardEngine over ``<data_dir>/shard-<i>``; a restarted shard recovers from its checkpoint and log
  before it serves (its constructor runs recovery). Ray re-sends the calls that were in flight
  (``max_task_retries=-1``); delta ids (client, seq) make a re-sent batch apply at most once.
- **The coordinator** (``mmsb-coordinator``, detached, restarted by Ray) owns the shard map, hands
  out page ids, and drives the two-phase epoch protocol (mmsb_dist/protocol.py) over the shards,
  recording attempts and decisions in its decision log before acting on them; a restarted
  coordinator rebuilds the protocol from that log and re-drives or aborts the epoch in flight.
- **The client** (``Bus``) finds both by name, places pages on shards with a jump consistent hash
  of the page id, sends one Arrow batch per shard for ``write_many``, and waits for durable
  acknowledgements.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
import time

import numpy as np
import ray

from mmsb_dist import limits
from mmsb_dist.delta import DeltaBatch
from mmsb_dist.errors import CorruptionError, EpochError
from mmsb_dist.formats import encode_deltas
from mmsb_dist.placement import shards_of
from mmsb_dist.protocol import (Abort, Commit, Committed, DecisionLog, EpochProtocol, Prepare,
                                RecordDecision)

__all__ = ["start", "connect", "stop", "Bus"]

COORDINATOR = "mmsb-coordinator"


def _shard_name(i: int) -> str:
    return f"mmsb-shard-{i}"


class ShardActor:
    """One shard: a ShardEngine behind a Ray actor. Calls run one at a time, in arrival order."""

    def __init__(self, shard: int, data_dir: str, backend: str, fsync: str):
        from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

        from mmsb_dist.engine import ShardEngine
        from mmsb_dist.errors import LogBusyError

        # A restarted shard may find its log still locked by the dying process for a moment; an
        # exception here would end the actor for good (Ray does not restart a failed constructor).
        open_engine = retry(retry=retry_if_exception_type(LogBusyError),
                            stop=stop_after_delay(limits.shard_log_busy_wait_s),
                            wait=wait_exponential(multiplier=0.05, max=2.0), reraise=True)(
            ShardEngine)
        self.engine = open_engine(os.path.join(data_dir, f"shard-{shard:04d}"), shard=shard,
                                  backend=backend, fsync=fsync)

    def ping(self) -> dict:
        return {"shard": self.engine.shard, "node": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "backend": self.engine.backend.name}

    def create_pages(self, ids, size: int, dtype: str) -> int:
        # A retried create (after a restart) finds its pages already there: create the rest.
        ids = np.asarray(ids, dtype=np.uint64)
        todo = ids[~self.engine.arena.present(ids)]
        if todo.size:
            self.engine.create_pages(ids=todo, size=size, dtype=dtype)
        return int(todo.size)

    def apply(self, payload) -> tuple:
        ack = self.engine.apply(payload)
        return ack.first_lsn, ack.count, ack.epoch, ack.duplicate

    def read_many(self, ids, epoch=None) -> list:
        return self.engine.read_many(ids, epoch)

    def seal(self, epoch: int) -> tuple:
        last = self.engine.last_sealed
        if epoch <= last:  # a re-driven prepare after a restart: the seal is already durable
            seal = next(s for s in self.engine.seals() if s.epoch == epoch)
        else:
            seal = self.engine.seal(epoch)
        return seal.cut, seal.state_hash

    def checkpoint(self, epoch: int) -> dict:
        info = self.engine.checkpoint(epoch)
        return {"epoch": info.epoch, "lsn": info.lsn, "bytes": info.stored_bytes}

    def replay_hash(self, epoch: int) -> int:
        return self.engine.replay(epoch).state_hash()

    def restore(self, epoch: int) -> int:
        self.engine.restore(epoch)
        return self.engine.state_hash()

    def stats(self) -> dict:
        return {**self.engine.statistics(), **self.ping()}


class CoordinatorActor:
    """Owns the shard map, page ids and the epoch protocol (see the module docstring)."""

    def __init__(self, data_dir: str, shards: int, backend: str, fsync: str,
                 prepare_timeout_s: float, auto_commit_s: float = 0.0, namespace: str = "mmsb",
                 gpus_per_shard: float = 1.0):
        os.makedirs(data_dir, exist_ok=True)
        self._lock = threading.RLock()  # the auto-commit thread and calls share the protocol
        self.data_dir, self.n = data_dir, int(shards)
        self.timeout = prepare_timeout_s
        opts = _shard_options(backend, namespace, gpus_per_shard)  # the runtime's namespace
        self.shards = [ray.remote(ShardActor).options(name=_shard_name(i), **opts).remote(
            i, data_dir, backend, fsync) for i in range(self.n)]
        try:  # every shard placed, recovered and serving
            ray.get([s.ping.remote() for s in self.shards], timeout=limits.shard_start_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise EpochError(
                f"{self.n} shards did not start within limits.shard_start_timeout_s="
                f"{limits.shard_start_timeout_s:g} s: does the cluster have the resources "
                f"({opts['num_cpus']} CPU, {opts['num_gpus']} GPU each)?"
            ) from exc
        self.dlog = DecisionLog(os.path.join(data_dir, "coordinator"))
        records = self.dlog.records()
        self.next_id = max([r["hwm"] for r in records if r["k"] == "ids"], default=0)
        self.ids_reserved = self.next_id
        self.proto, todo = EpochProtocol.recover(range(self.n), records, now=time.monotonic(),
                                                 prepare_timeout_s=prepare_timeout_s)
        self._carry_out(todo)
        if auto_commit_s > 0:
            threading.Thread(target=self._auto_commit, args=(auto_commit_s,), daemon=True,
                             name="mmsb-auto-commit").start()

    def _auto_commit(self, every_s: float) -> None:
        """Commit every ``every_s`` seconds (an aborted attempt is retried at the next tick)."""
        while True:
            time.sleep(every_s)
            try:
                self.commit()
            except EpochError:
                continue

    def info(self) -> dict:
        return {"shards": self.n, "data_dir": self.data_dir,
                "last_committed": self.proto.last_committed}

    def allocate_ids(self, n: int) -> int:
        """``n`` fresh page ids, ``[start, start + n)``. The high-water mark is logged before the
        ids are handed out, so a restarted coordinator never hands them out again."""
        with self._lock:
            start = self.next_id
            self.next_id += int(n)
            if self.next_id > self.ids_reserved:
                self.ids_reserved = self.next_id + limits.page_ids_reserve_block
                self.dlog._append("ids", epoch=self.proto.last_epoch, hwm=self.ids_reserved)
            return start

    def commit(self) -> int:
        """Close the open epoch on every shard; returns it once committed. EpochError when the
        attempt was aborted (a shard failed or timed out): nothing was committed then."""
        with self._lock:
            committed = self._carry_out(self.proto.begin(now=time.monotonic()))
            if not committed:
                raise EpochError(f"epoch {self.proto.last_epoch} was aborted")
            return committed[-1]

    def restore(self, epoch: int) -> int:
        """Roll every shard back to committed ``epoch``, then commit the restored state as a new
        epoch (returned). Writers should be quiet meanwhile: a write that lands on a shard after
        its rollback is kept. Retry on failure: restoring twice to one epoch is harmless."""
        with self._lock:
            if int(epoch) not in self.proto.committed:
                raise EpochError(f"epoch {epoch} was never committed")
            ray.get([s.restore.remote(int(epoch)) for s in self.shards])
            return self.commit()

    def _carry_out(self, instructions) -> list[int]:
        queue, committed = list(instructions), []
        while queue:
            ins = queue.pop(0)
            if isinstance(ins, Prepare):
                self.dlog.attempt(ins.epoch)
                queue += self._prepare(ins)
            elif isinstance(ins, RecordDecision):
                self.dlog.decide(ins.epoch, ins.cuts)
                queue += self.proto.decision_recorded(ins.epoch)
            elif isinstance(ins, Commit):
                for s in ins.shards:  # shards keep no per-commit state yet: the decision is it
                    queue += self.proto.commit_acked(s, ins.epoch)
            elif isinstance(ins, Committed):
                self.dlog.committed(ins.epoch)
                committed.append(ins.epoch)
            elif isinstance(ins, Abort):
                continue
        return committed

    def _prepare(self, ins: Prepare) -> list:
        refs = {s: self.shards[s].seal.remote(ins.epoch) for s in ins.shards}
        out = []
        for s, ref in refs.items():
            try:
                cut, h = ray.get(ref, timeout=self.timeout)
            except (ray.exceptions.RayError, TimeoutError):
                return self.proto.shard_failed(s, now=time.monotonic())
            out += self.proto.prepared(s, ins.epoch, cut, h)
        return out + self.proto.tick(now=time.monotonic())

    def committed(self) -> dict:
        return {e: {s: list(c) for s, c in cuts.items()} for e, cuts in self.proto.committed.items()}

    def checkpoint(self) -> int:
        with self._lock:
            epoch = self.proto.last_committed
            if epoch == 0:
                raise EpochError("nothing committed yet: commit before checkpointing")
            ray.get([s.checkpoint.remote(epoch) for s in self.shards])
            return epoch

    def replay(self, epoch: int) -> dict:
        """Rebuild every shard's state at committed ``epoch`` in parallel, beside the live state,
        and check it against the recorded hashes."""
        cuts = self.proto.committed.get(int(epoch))
        if cuts is None:
            raise EpochError(f"epoch {epoch} was never committed")
        got = ray.get([self.shards[s].replay_hash.remote(int(epoch)) for s in range(self.n)])
        bad = [s for s in range(self.n) if got[s] != cuts[s][1]]
        if bad:
            raise CorruptionError(f"replay of epoch {epoch} differs from its recorded hash on "
                                  f"shards {bad}")
        return {s: f"{h:016x}" for s, h in enumerate(got)}


def _shard_options(backend: str, namespace: str, gpus_per_shard: float) -> dict:
    gpu = backend == "cupy" or (backend == "auto" and
                                ray.cluster_resources().get("GPU", 0) >= 1)
    return dict(namespace=namespace, lifetime="detached", max_restarts=-1, max_task_retries=-1,
                num_cpus=0 if gpu else 1, num_gpus=gpus_per_shard if gpu else 0,
                scheduling_strategy="SPREAD", get_if_exists=True)


class Bus:
    """A client of a running mmsb-dist: see ``connect``. Every write returns once durable."""

    def __init__(self, namespace: str = "mmsb"):
        self.coordinator = ray.get_actor(COORDINATOR, namespace=namespace)
        self.info = ray.get(self.coordinator.info.remote())
        self.n = self.info["shards"]
        self.shards = [ray.get_actor(_shard_name(i), namespace=namespace) for i in range(self.n)]
        self.client_id = secrets.randbits(63) | 1  # non-zero: this client's batches de-duplicate
        self._seq = 0
        self._committed: set[int] = set()  # committed epochs never change: safe to cache

    # ---- pages --------------------------------------------------------------------------------

    def create_pages(self, n: int, size: int, dtype: str = "uint8") -> np.ndarray:
        start = ray.get(self.coordinator.allocate_ids.remote(int(n)))
        ids = np.arange(start, start + int(n), dtype=np.uint64)
        owners = shards_of(ids, self.n)
        ray.get([self.shards[s].create_pages.remote(ids[owners == s], size, dtype)
                 for s in np.unique(owners)])
        return ids

    def create_page(self, size: int, dtype: str = "uint8") -> int:
        return int(self.create_pages(1, size, dtype)[0])

    # ---- writes -------------------------------------------------------------------------------

    def write(self, page_id: int, offset: int, data) -> None:
        """One run, durable on return. The short path of write_many: one shard, no regrouping,
        and the encoded batch travels as bytes (inline in the Ray call)."""
        self._seq += 1
        batch = DeltaBatch.runs([page_id], [offset], [data], client_id=self.client_id,
                                seq=self._seq)
        shard = self.shards[int(shards_of(batch.page_ids, self.n)[0])]
        ray.get(shard.apply.remote(encode_deltas(batch).to_pybytes()))

    def write_many(self, page_ids, offsets, payloads) -> int:
        """One Arrow batch per shard (cut at ``limits.batch_deltas_max``), at most
        ``limits.inflight_batches_max`` batches in flight per shard; returns once every delta is
        durable. Per page, deltas apply in the order given."""
        batch = DeltaBatch.runs(page_ids, offsets, payloads)
        batch.check()
        owners = shards_of(batch.page_ids, self.n)
        inflight: dict[int, list] = {}
        for s in np.unique(owners):
            rows = np.flatnonzero(owners == s)
            for lo in range(0, rows.size, limits.batch_deltas_max):
                part = (batch if rows.size == len(batch) <= limits.batch_deltas_max  # no copy
                        else batch.take(rows[lo:lo + limits.batch_deltas_max]))
                self._seq += 1
                part = dataclasses.replace(part, client_id=self.client_id, seq=self._seq)
                window = inflight.setdefault(int(s), [])
                if len(window) >= limits.inflight_batches_max:  # backpressure
                    ray.get(window.pop(0))
                payload = np.frombuffer(encode_deltas(part), dtype=np.uint8)
                window.append(self.shards[s].apply.remote(payload))
        ray.get([ref for window in inflight.values() for ref in window])
        return len(batch)

    # ---- reads --------------------------------------------------------------------------------

    def read(self, page_id: int, epoch: int | None = None) -> np.ndarray:
        return self.read_many([page_id], epoch)[0]

    def read_many(self, page_ids, epoch: int | None = None) -> list[np.ndarray]:
        ids = np.ascontiguousarray(page_ids, dtype=np.uint64).reshape(-1)
        if epoch is not None:
            epoch = self._check_committed(int(epoch))
        owners = shards_of(ids, self.n)
        out: list = [None] * ids.size
        groups = {int(s): np.flatnonzero(owners == s) for s in np.unique(owners)}
        results = ray.get([self.shards[s].read_many.remote(ids[rows], epoch)
                           for s, rows in groups.items()])
        for rows, arrays in zip(groups.values(), results):
            for r, a in zip(rows, arrays):
                out[r] = a
        return out

    def _check_committed(self, epoch: int) -> int:
        """Shards can replay any epoch they sealed, but an aborted attempt's seals must never be
        read: only epochs with a recorded decision are."""
        if epoch not in self._committed:
            self._committed = set(self.committed_epochs())
            if epoch not in self._committed:
                raise EpochError(f"epoch {epoch} was never committed")
        return epoch

    # ---- epochs -------------------------------------------------------------------------------

    def commit(self) -> int:
        return ray.get(self.coordinator.commit.remote())

    def checkpoint(self) -> int:
        return ray.get(self.coordinator.checkpoint.remote())

    def replay(self, epoch: int) -> dict:
        return ray.get(self.coordinator.replay.remote(int(epoch)))

    def restore(self, epoch: int) -> int:
        """Roll the live runtime back to committed ``epoch`` (explicitly); returns the new epoch
        that holds the restored state."""
        return ray.get(self.coordinator.restore.remote(int(epoch)))

    def committed_epochs(self) -> list[int]:
        return sorted(ray.get(self.coordinator.committed.remote()))

    def stats(self) -> dict:
        return {"shards": ray.get([s.stats.remote() for s in self.shards]),
                "committed": self.committed_epochs()}

    def close(self) -> None:
        """Drop this client's handles (the runtime keeps running)."""
        self.shards, self.coordinator = [], None


def start(shards: int = 1, data_dir: str | None = None, config: dict | None = None, *,
          namespace: str = "mmsb", address: str | None = None) -> Bus:
    """Start (or reuse) the runtime: a local Ray instance unless Ray is already initialized or an
    ``address`` is given, then the coordinator and ``shards`` shard actors. ``config``: backend
    ("auto", "numpy", "cupy"), fsync ("always", "interval", "none"), prepare_timeout_s,
    auto_commit_s (commit every so many seconds; 0: only explicit commits), gpus_per_shard
    (1: one GPU each; a fraction shares a GPU between shards)."""
    config = {"backend": "auto", "fsync": "always", "prepare_timeout_s": 30.0,
              "auto_commit_s": 0.0, "gpus_per_shard": 1.0, **(config or {})}
    if shards < 1:
        raise ValueError(f"shards={shards}: need at least one shard")
    if not ray.is_initialized():
        # A new local instance unless an address is given: never join whatever cluster happens to
        # run on this host. Logical CPUs: one per shard at least (they mostly wait on the disk).
        local = address is None
        ray.init(address="local" if local else address, namespace=namespace,
                 include_dashboard=False, log_to_driver=False,
                 num_cpus=max(os.cpu_count() or 1, shards + 1) if local else None)
    data_dir = os.path.abspath(data_dir or os.path.join(os.getcwd(), "mmsb-data"))
    coordinator = ray.remote(CoordinatorActor).options(
        name=COORDINATOR, namespace=namespace, lifetime="detached", max_restarts=-1,
        max_task_retries=-1, num_cpus=0, get_if_exists=True).remote(
        data_dir, shards, config["backend"], config["fsync"], config["prepare_timeout_s"],
        config["auto_commit_s"], namespace, config["gpus_per_shard"])
    ray.get(coordinator.info.remote())
    return Bus(namespace)


def connect(address: str = "auto", namespace: str = "mmsb") -> Bus:
    """A client of a runtime started elsewhere (``mmsb-dist start`` or ``start()``)."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    return Bus(namespace)


def stop(namespace: str = "mmsb") -> None:
    """Stop the runtime's actors (their data stays on disk)."""
    try:
        coordinator = ray.get_actor(COORDINATOR, namespace=namespace)
        n = ray.get(coordinator.info.remote())["shards"]
    except ValueError:
        return
    for i in range(n):
        try:
            ray.kill(ray.get_actor(_shard_name(i), namespace=namespace), no_restart=True)
        except ValueError:
            pass
    ray.kill(coordinator, no_restart=True)
