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
import logging
import os
import secrets
import threading
import time

import numpy as np
import ray

from mmsb_dist import limits
from mmsb_dist.delta import DeltaBatch
from mmsb_dist.errors import (CorruptionError, EpochError, InvalidPageError, LogFailedError,
                              MmsbError, OrderError)
from mmsb_dist.graph import DependencyGraph, changed_pages, make_fn, run_plan
from mmsb_dist.formats import encode_deltas
from mmsb_dist.placement import shards_of
from mmsb_dist.protocol import (Abort, Commit, Committed, DecisionLog, EpochProtocol, Prepare,
                                RecordDecision)

__all__ = ["start", "connect", "stop", "Bus"]

COORDINATOR = "mmsb-coordinator"


def _shard_name(i: int) -> str:
    return f"mmsb-shard-{i}"


class ShardActor:
    """One shard: a ShardEngine behind a Ray actor. Writes (``apply``) run on a few threads that
    take turns at the engine; other calls run one at a time, in arrival order."""

    def __init__(self, shard: int, data_dir: str, backend: str, fsync: str,
                 checkpoint_uri: str | None = None):
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
                                  backend=backend, fsync=fsync, checkpoints=checkpoint_uri)
        from mmsb_dist.metrics import ShardMetrics
        self.metrics = ShardMetrics(ray.get_runtime_context().namespace, shard, self.engine)
        self._gate = threading.Condition()  # writes wait on it while a barrier holds them
        self._frozen: tuple[int, float] | None = None  # (epoch, deadline) of the barrier
        self._peers: dict = {}  # shard -> actor handle, for eager cross-shard propagation

    @ray.method(concurrency_group="control")
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

    @ray.method(concurrency_group="writes")
    def apply(self, *parts, after: int | None = None) -> tuple:
        """Apply one encoded batch, sent whole or in consecutive pieces (see Bus._submit).
        ``after``: the client's batch this one must follow (ShardEngine.apply; Bus.write_many).

        Runs on one of the "writes" threads: a batch is decoded and checked while the one before
        it is logged and applied, then waits for the gate (and, if it names one, for the batch it
        follows: threads may take a client's batches out of order)."""
        start = time.perf_counter()
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        ready = self.engine.prepare(payload)
        if after is not None:
            self.engine.wait_applied(ready.batch.client_id, after, limits.shard_order_wait_s)
        with self._gate:
            self._wait_open()
            try:
                ack = self.engine.apply(ready, after=after)
            except LogFailedError:
                # fail-stop: the log can no longer be written (an fsync failed, the disk is gone)
                # and the engine's memory may be ahead of it. Ray restarts the shard, which
                # recovers from the log; this call is retried and applies at most once.
                logging.getLogger(__name__).critical("shard %d: log failed; restarting",
                                                     self.engine.shard, exc_info=True)
                os._exit(75)
            self.metrics.applied(0 if ack.duplicate else ack.count,  # bytes: the encoded batch
                                 getattr(payload, "nbytes", None) or len(payload),
                                 time.perf_counter() - start)
        self._send_outbox()
        return ack.first_lsn, ack.count, ack.epoch, ack.duplicate

    def read_many(self, ids, epoch=None) -> list:
        return self.engine.read_many(ids, epoch)

    @ray.method(concurrency_group="control")
    def seal(self, epoch: int, held: bool = False) -> tuple:
        """Seal ``epoch``; ``held``: the barrier froze this shard first, and must still hold it
        (a shard that restarted or timed out in between may have taken writes since the
        recompute, so its seal is refused and the attempt aborts). Ends the barrier."""
        with self._gate:
            try:
                last = self.engine.last_sealed
                if epoch <= last:  # a re-driven prepare after a restart: already durable
                    seal = next(s for s in self.engine.seals() if s.epoch == epoch)
                elif held and (self._frozen is None or self._frozen[0] != epoch):
                    raise EpochError(f"shard {self.engine.shard} was not held for the barrier "
                                     f"of epoch {epoch} (restarted or timed out)")
                else:
                    seal = self.engine.seal(epoch)
            finally:
                self._frozen = None
                self._gate.notify_all()
        return seal.cut, seal.state_hash

    def checkpoint(self, epoch: int) -> dict:
        info = self.engine.checkpoint(epoch)
        self.metrics.checkpointed(info.lsn, info.epoch)
        return {"epoch": info.epoch, "lsn": info.lsn, "bytes": info.stored_bytes}

    def replay_hash(self, epoch: int) -> int:
        return self.engine.replay(epoch).state_hash()

    def restore(self, epoch: int) -> int:
        self.engine.restore(epoch)
        return self.engine.state_hash()

    @ray.method(concurrency_group="control")
    def stats(self) -> dict:
        return {**self.engine.statistics(), **self.ping(), "metrics": self.metrics.totals()}

    # ---- the barrier and derived pages (mmsb_dist/graph.py) --------------------------------------
    # These run on the "control" threads, so the coordinator reaches a shard whose write threads
    # are held back until the barrier is over (calls of one group run in arrival order).

    def _wait_open(self) -> None:
        """Called with the gate held: wait while a barrier holds writes (at most until its
        deadline: a coordinator that died mid-barrier does not stop writes for good)."""
        while self._frozen is not None:
            left = self._frozen[1] - time.monotonic()
            if left <= 0:
                self._frozen = None
                self._gate.notify_all()
                return
            self._gate.wait(left)

    def _send_outbox(self) -> None:
        """Eager cross-shard propagation: changed parents' bytes to the shards of their children
        (fire and forget: the barrier recomputes from the cut whatever these do not)."""
        for shard, values in self.engine.take_outbox().items():
            handle = self._peers.get(shard)
            if handle is None:
                handle = self._peers[shard] = ray.get_actor(
                    _shard_name(shard), namespace=ray.get_runtime_context().namespace)
            handle.parent_changed.remote(values)

    def parent_changed(self, values: dict) -> int:
        with self._gate:
            self._wait_open()
            done = self.engine.remote_changed(values)["changed"]
        self._send_outbox()
        return done

    @ray.method(concurrency_group="control")
    def freeze(self, epoch: int, hold_s: float = limits.barrier_hold_s) -> tuple:
        """Hold writes for the barrier of ``epoch`` (for ``hold_s`` at most); report the changed
        parents."""
        with self._gate:
            self._frozen = (int(epoch), time.monotonic() + float(hold_s))
            ids, unknown = self.engine.changes()
            return ids, unknown

    @ray.method(concurrency_group="control")
    def thaw(self) -> None:
        with self._gate:
            self._frozen = None
            self._gate.notify_all()

    @ray.method(concurrency_group="control")
    def read_cut(self, ids) -> list:
        return self.engine.read_cut(ids)

    @ray.method(concurrency_group="control")
    def recompute(self, children, remote) -> dict:
        if self._frozen is None:
            raise EpochError(f"shard {self.engine.shard} is not in a barrier (it restarted or "
                             "its barrier timed out)")
        return self.engine.recompute(children, remote)

    @ray.method(concurrency_group="control")
    def derive(self, child: int, parents, fn: bytes) -> None:
        self.engine.derive(child, parents, fn)

    @ray.method(concurrency_group="control")
    def underive(self, child: int) -> None:
        self.engine.underive(child)

    @ray.method(concurrency_group="control")
    def derivations(self) -> list:
        return self.engine.derivations()

    @ray.method(concurrency_group="control")
    def set_watch(self, table: dict) -> None:
        self.engine.set_watch(table)

    @ray.method(concurrency_group="control")
    def page_info(self, ids) -> list:
        return self.engine.page_info(ids)

    # ---- events (mmsb_dist/events.py) ---------------------------------------------------------

    @ray.method(concurrency_group="events")  # reads the log only: not held by a barrier
    def events(self, from_lsn: int, page_ids=None, *, with_deltas: bool = False,
               rows_max: int | None = None, epoch_min: int = 0) -> tuple:
        """One bounded event batch from ``from_lsn``: (Arrow IPC bytes as uint8, next LSN, more)."""
        from mmsb_dist.events import encode_event_read

        read = self.engine.events(from_lsn, page_ids, with_deltas=with_deltas,
                                  rows_max=rows_max, epoch_min=epoch_min)
        return encode_event_read(read, self.engine.shard)

    def event_position(self, epoch: int | None = None) -> int:
        """Where a subscription starts: the events of ``epoch`` on, or (None) what comes next."""
        if epoch is None:
            return self.engine.log.next_lsn
        return self.engine.epoch_start_lsn(int(epoch))


class CoordinatorActor:
    """Owns the shard map, page ids and the epoch protocol (see the module docstring)."""

    def __init__(self, data_dir: str, shards: int, backend: str, fsync: str,
                 prepare_timeout_s: float, auto_commit_s: float = 0.0, namespace: str = "mmsb",
                 gpus_per_shard: float = 1.0, checkpoint_uri: str | None = None):
        os.makedirs(data_dir, exist_ok=True)
        self._lock = threading.RLock()  # the auto-commit thread and calls share the protocol
        self.data_dir, self.n = data_dir, int(shards)
        self.timeout = prepare_timeout_s
        opts = _shard_options(backend, namespace, gpus_per_shard)  # the runtime's namespace
        actor = ray.remote(concurrency_groups={"control": 2, "events": 1,
                                                "writes": limits.shard_write_threads})(ShardActor)
        self.shards = [actor.options(name=_shard_name(i), **opts).remote(
            i, data_dir, backend, fsync, checkpoint_uri) for i in range(self.n)]
        try:  # every shard placed, recovered and serving
            ray.get([s.ping.remote() for s in self.shards], timeout=limits.shard_start_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise EpochError(
                f"{self.n} shards did not start within limits.shard_start_timeout_s="
                f"{limits.shard_start_timeout_s:g} s: does the cluster have the resources "
                f"({opts['num_cpus']} CPU, {opts['num_gpus']} GPU each)?"
            ) from exc
        # A barrier of a previous coordinator process may still hold writes: none is in progress
        # now (a re-driven attempt holds them again).
        ray.get([s.thaw.remote() for s in self.shards])
        self._load_graph()
        self.dlog = DecisionLog(os.path.join(data_dir, "coordinator"))
        records = self.dlog.records()
        self.next_id = max([r["hwm"] for r in records if r["k"] == "ids"], default=0)
        self.ids_reserved = self.next_id
        self.proto, todo = EpochProtocol.recover(range(self.n), records, now=time.monotonic(),
                                                 prepare_timeout_s=prepare_timeout_s)
        self._carry_out(todo)
        from mmsb_dist.metrics import CoordinatorMetrics
        self.metrics = CoordinatorMetrics(namespace, self.proto.last_committed)
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
            start = time.perf_counter()
            committed = self._carry_out(self.proto.begin(now=time.monotonic()))
            if not committed:
                self.metrics.aborted()
                raise EpochError(f"epoch {self.proto.last_epoch} was aborted")
            self.metrics.committed(committed[-1], time.perf_counter() - start)
            return committed[-1]

    def stats(self) -> dict:
        """Shard count, data directory and the commit metrics' totals (mmsb_dist/metrics.py)."""
        return {**self.info(), **self.metrics.totals()}

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
        if not self.graph.parents:  # nothing derived: each shard's seal is the whole barrier
            refs = {s: self.shards[s].seal.remote(ins.epoch) for s in ins.shards}
            return self._collect_seals(ins.epoch, refs)

        def fetch(wanted):
            got = self._gather({o: self.shards[o].read_cut.remote(ids)
                                for o, ids in wanted.items()})
            return {p: v for o, ids in wanted.items() for p, v in zip(ids, got[o])}

        def recompute(tasks):
            return self._gather({s: self.shards[s].recompute.remote(ch, rem)
                                 for s, (ch, rem) in tasks.items()})

        try:  # hold writes, recompute from the cut in topological order, then seal
            reports = self._gather({s: self.shards[s].freeze.remote(ins.epoch)
                                    for s in ins.shards})
            changed = changed_pages(self.graph, reports, self._owner, self.pending)
            plan = self.graph.plan(changed, self._owner)
            errors = run_plan(self.graph, plan, self._owner, fetch, recompute)
        except _ShardCallFailed as failed:
            for s in ins.shards:  # let writes through again (a shard that is gone needs nothing)
                self.shards[s].thaw.remote()
            return self.proto.shard_failed(failed.shard, now=time.monotonic())
        self.recompute_errors = (self.recompute_errors + [
            {"epoch": ins.epoch, "page": c, "error": m} for c, m in errors
        ])[-limits.recompute_errors_kept:]
        self.recomputed_pages += len(plan)
        restarted = [s for s, (_, unknown) in reports.items() if unknown]
        out = self._collect_seals(ins.epoch, {s: self.shards[s].seal.remote(ins.epoch, True)
                                              for s in ins.shards})
        if any(isinstance(i, Abort) for i in out):
            return out
        self.pending.clear()
        if restarted:  # their watch tables died with them
            self._push_watch(restarted)
        return out

    def _collect_seals(self, epoch: int, refs: dict) -> list:
        try:
            seals = self._gather(refs)
        except _ShardCallFailed as failed:
            return self.proto.shard_failed(failed.shard, now=time.monotonic())
        out = []
        for s, (cut, h) in seals.items():
            out += self.proto.prepared(s, epoch, cut, h)
        return out + self.proto.tick(now=time.monotonic())

    def _gather(self, refs: dict) -> dict:
        """shard -> result of each call, each within the prepare timeout; _ShardCallFailed
        naming the first shard whose call failed or timed out."""
        out = {}
        for s, ref in refs.items():
            try:
                out[s] = ray.get(ref, timeout=self.timeout)
            except (ray.exceptions.RayError, TimeoutError, MmsbError) as exc:
                raise _ShardCallFailed(s) from exc
        return out

    # ---- the dependency graph ------------------------------------------------------------------

    def _owner(self, page: int) -> int:
        return int(shards_of(np.array([page], np.uint64), self.n)[0])

    def _load_graph(self) -> None:
        """The graph is the union of the shards' derived pages (each shard logs its own): a
        restarted coordinator rebuilds it and recomputes every derived page at the next barrier
        (an unchanged one logs nothing)."""
        per_shard = ray.get([s.derivations.remote() for s in self.shards])
        self.graph = DependencyGraph.from_edges(e for edges in per_shard for e in edges)
        self.pending = set(self.graph.parents)
        self.recompute_errors: list = []
        self.recomputed_pages = 0
        self._push_watch(range(self.n))

    def _push_watch(self, shards) -> None:
        tables = self.graph.watch_tables(self._owner)
        ray.get([self.shards[s].set_watch.remote(tables.get(s, {})) for s in shards])

    def depend(self, child: int, parents, fn: bytes) -> None:
        """Register derived page ``child`` = fn(parents): checked whole (pages exist, no cycle,
        shapes fit ``fn``) before anything is registered; computed at the next barrier."""
        from mmsb_dist.graph import Recompute, check_shapes

        with self._lock:
            parents = self.graph.check_add(child, parents)
            pages = [int(child), *parents]
            owners = [self._owner(p) for p in pages]
            infos = {}
            for o in set(owners):
                ids = [p for p, w in zip(pages, owners) if w == o]
                ref = self.shards[o].page_info.remote(ids)
                infos.update(zip(ids, _unwrap(lambda: ray.get(ref))))
            check_shapes(Recompute.decode(fn), int(child), infos[int(child)],
                         [(p, infos[p]) for p in parents])
            _unwrap(lambda: ray.get(self.shards[owners[0]].derive.remote(int(child), parents, fn)))
            self.graph.add(child, parents)
            self.pending.add(int(child))
            self._push_watch(sorted(set(owners)))

    def undepend(self, child: int) -> None:
        with self._lock:
            if not self.graph.is_derived(child):
                raise InvalidPageError(f"page {child} is not derived", page=int(child))
            owners = {self._owner(p) for p in (int(child), *self.graph.parents[int(child)])}
            _unwrap(lambda: ray.get(self.shards[self._owner(child)].underive.remote(int(child))))
            self.graph.remove(child)
            self.pending.discard(int(child))
            self._push_watch(sorted(owners))

    def graph_stats(self) -> dict:
        return {"derived_pages": len(self.graph), "pending": len(self.pending),
                "recomputed_pages": self.recomputed_pages,
                "recompute_errors": list(self.recompute_errors)}

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


class _Window:
    """The batches of one ``write_many`` call in flight to one shard, oldest first (at most
    ``limits.inflight_batches_max``). Each one after the first names the batch it follows, so that
    the shard never applies it first: it waits for that one (its write threads, or Ray re-sending
    calls after a restart, may take them out of order), and refuses it (OrderError) if it does not
    come; the window then waits for every call in flight and re-sends, in order, the batches that
    were not applied (an applied one is acknowledged as a duplicate)."""

    def __init__(self, bus: "Bus", shard: int):
        self.bus, self.shard = bus, shard
        self.items: list[tuple] = []   # (ObjectRef of the ack, stamped batch)

    def push(self, part: DeltaBatch) -> None:
        if len(self.items) >= limits.inflight_batches_max:  # backpressure
            self._wait_oldest()
        after = self.items[-1][1].seq if self.items else None
        self.items.append((self.bus._submit(self.shard, part, after), part))

    def drain(self) -> None:
        while self.items:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        if _acked(self.items[0][0]):
            self.items.pop(0)
            return
        # refused for order: once every call in flight has answered, re-send the refused ones,
        # one at a time (each follows a batch known to be applied)
        refused = [part for ref, part in self.items if not _acked(ref)]
        self.items = []
        for part in refused:
            ray.get(self.bus._submit(self.shard, part))


def _acked(ref) -> bool:
    """Whether the shard applied (or already had) the batch of ``ref``; False if it refused it
    with OrderError; any other failure is raised."""
    try:
        ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if not isinstance(exc.cause, OrderError):
            raise
        return False
    return True


class _ShardCallFailed(Exception):
    """A shard's part of a barrier failed or timed out (the attempt aborts)."""

    def __init__(self, shard: int):
        super().__init__(f"shard {shard}")
        self.shard = shard


def _unwrap(call):
    """``call()``, re-raising a typed error a shard raised as itself (not wrapped by Ray)."""
    try:
        return call()
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, MmsbError):
            raise exc.cause from None
        raise


def _shard_options(backend: str, namespace: str, gpus_per_shard: float) -> dict:
    gpu = backend == "cupy" or (backend == "auto" and
                                ray.cluster_resources().get("GPU", 0) >= 1)
    return dict(namespace=namespace, lifetime="detached", max_restarts=-1, max_task_retries=-1,
                num_cpus=0 if gpu else 1, num_gpus=gpus_per_shard if gpu else 0,
                scheduling_strategy="SPREAD", get_if_exists=True)


class Bus:
    """A client of a running mmsb-dist: see ``connect``. Every write returns once durable."""

    def __init__(self, namespace: str = "mmsb", *, timeout_s: float | None = None):
        self.coordinator = ray.get_actor(COORDINATOR, namespace=namespace)
        self.info = ray.get(self.coordinator.info.remote(), timeout=timeout_s)
        self.n = self.info["shards"]
        self.shards = [ray.get_actor(_shard_name(i), namespace=namespace) for i in range(self.n)]
        self.client_id = secrets.randbits(63) | 1  # non-zero: this client's batches de-duplicate
        self._seq = 0
        self._committed: set[int] = set()  # committed epochs never change: safe to cache

    # ---- pages --------------------------------------------------------------------------------

    def create_pages(self, n: int, size: int, dtype: str = "uint8") -> np.ndarray:
        start = ray.get(self.coordinator.allocate_ids.remote(int(n)))
        ids, refs = self._create_on_shards(start, n, size, dtype)
        ray.get(refs)
        return ids

    def _create_on_shards(self, start: int, n: int, size: int, dtype: str) -> tuple:
        """Pages ``[start, start + n)`` (ids the coordinator handed out) created on their shards:
        (ids, the calls' ObjectRefs)."""
        ids = np.arange(start, start + int(n), dtype=np.uint64)
        owners = shards_of(ids, self.n)
        return ids, [self.shards[s].create_pages.remote(ids[owners == s], size, dtype)
                     for s in np.unique(owners)]

    def create_page(self, size: int, dtype: str = "uint8") -> int:
        return int(self.create_pages(1, size, dtype)[0])

    # ---- writes -------------------------------------------------------------------------------

    def write(self, page_id: int, offset: int, data) -> None:
        """One run, durable on return. The short path of write_many: one shard, no regrouping,
        and the encoded batch travels as bytes (inline in the Ray call)."""
        batch = self._stamp(DeltaBatch.runs([page_id], [offset], [data]))
        ray.get(self._submit(int(shards_of(batch.page_ids, self.n)[0]), batch))

    def write_many(self, page_ids, offsets, payloads) -> int:
        """One Arrow batch per shard (cut at ``limits.write_batch_deltas``), at most
        ``limits.inflight_batches_max`` batches in flight per shard; returns once every delta is
        durable. Per page, deltas apply in the order given."""
        batch = DeltaBatch.runs(page_ids, offsets, payloads)
        batch.check()
        windows: dict[int, _Window] = {}
        for s, part in self._parts(batch):
            windows.setdefault(s, _Window(self, s)).push(self._stamp(part))
        for window in windows.values():
            window.drain()
        return len(batch)

    def _parts(self, batch: DeltaBatch):
        """(shard, part) of ``batch``: the deltas of each shard in their order, cut at
        ``limits.write_batch_deltas`` so that a large call keeps several batches in flight (the
        batch itself where it is one shard's and fits; slices of it where it is one shard's)."""
        cut = limits.write_batch_deltas
        owners = shards_of(batch.page_ids, self.n)
        counts = np.bincount(owners, minlength=self.n)  # O(n), unlike np.unique's sort
        for s in np.flatnonzero(counts):
            if counts[s] == len(batch):  # one shard: the batch itself, or slices of it
                if len(batch) <= cut:
                    yield int(s), batch
                    continue
                # a short first slice: the shard starts on it while the client encodes the rest
                bounds = [0] + list(range(cut // 4, len(batch), cut)) + [len(batch)]
                for lo, hi in zip(bounds, bounds[1:]):
                    yield int(s), batch.slice(lo, hi)
                continue
            rows = np.flatnonzero(owners == s)
            for lo in range(0, rows.size, cut):
                yield int(s), batch.take(rows[lo:lo + cut])

    def _stamp(self, part: DeltaBatch) -> DeltaBatch:
        """``part`` under this client's next delta id (a re-sent batch then applies once)."""
        self._seq += 1
        return dataclasses.replace(part, client_id=self.client_id, seq=self._seq)

    def _submit(self, shard: int, part: DeltaBatch, after: int | None = None):
        """Send an encoded batch to ``shard``; the ObjectRef of its durable ack. A batch of up to
        ``limits.inline_chunked_bytes_max`` travels inline in the call, as bytes arguments of at
        most ``limits.inline_batch_bytes_max`` each (Ray inlines each argument under its 100 KB
        direct-call limit); a larger one as one array, through the object store."""
        encoded = encode_deltas(part)
        kw = {} if after is None else {"after": after}   # a keyword costs Ray ~65 us a call
        if encoded.size > limits.inline_chunked_bytes_max:
            return self.shards[shard].apply.remote(np.frombuffer(encoded, dtype=np.uint8), **kw)
        step = limits.inline_batch_bytes_max
        return self.shards[shard].apply.remote(
            *[encoded[i:i + step].to_pybytes() for i in range(0, encoded.size, step)], **kw)

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

    # ---- tracking and events (mmsb_dist/events.py) ----------------------------------------------

    def track(self, page_id: int):
        """``with bus.track(page) as arr:`` -- ``arr`` is a writable host copy of the page (typed);
        on a normal exit its difference from the page as read is written as one masked delta,
        durable on return and applied at most once (this client's delta id); nothing is written
        when the block raises or changes nothing. The returned object's ``delta`` and ``ack``
        say what was written."""
        from mmsb_dist.engine import Ack
        from mmsb_dist.events import PageTrack

        page_id = int(page_id)

        def write(delta):
            delta = self._stamp(delta)
            ref = self._submit(int(shards_of(delta.page_ids, self.n)[0]), delta)
            return delta, Ack(*ray.get(ref))

        return PageTrack(page_id, lambda: self.read(page_id), write)

    def subscribe(self, page_ids=None, from_epoch: int | None = None, from_lsn=None,
                  with_deltas: bool = False, *,
                  prefetch_batches: int = limits.subscription_prefetch_batches_max,
                  poll_s: float = limits.subscription_poll_s):
        """An iterator of event batches (``events.Subscription``): every change to ``page_ids``
        (None: to every page) in log order per shard, exactly once, surviving shard restarts.
        Starts at ``from_lsn`` (a ``Subscription.position`` saved earlier: {shard: LSN}), else
        at the events of ``from_epoch``, else at what comes next. docs/events.md."""
        from mmsb_dist.events import Subscription

        if from_epoch is not None and from_lsn is not None:
            raise ValueError("give from_epoch or from_lsn, not both")
        wanted = None
        shards = list(range(self.n))
        if page_ids is not None:
            ids = np.unique(np.ascontiguousarray(page_ids, dtype=np.uint64).reshape(-1))
            owners = shards_of(ids, self.n)
            wanted = {int(s): ids[owners == s] for s in np.unique(owners)}
            shards = sorted(wanted)  # a shard that owns none of the pages has no events for us
        if from_lsn is not None:
            start = {int(s): int(v) for s, v in dict(from_lsn).items()}
            missing = [s for s in shards if s not in start]
            if missing:
                raise ValueError(f"from_lsn has no position for shards {missing}")
        else:
            epoch = None if from_epoch is None else int(from_epoch)
            start = dict(zip(shards, ray.get([self.shards[s].event_position.remote(epoch)
                                              for s in shards])))
        return Subscription({s: self.shards[s] for s in shards}, start, page_ids=wanted,
                            with_deltas=with_deltas, epoch_min=int(from_epoch or 0),
                            prefetch_batches=prefetch_batches, poll_s=poll_s)

    # ---- derived pages (mmsb_dist/graph.py) -----------------------------------------------------

    def depend(self, child: int, parents, fn) -> None:
        """Make ``child`` a derived page: ``fn(parents)``, recomputed at every commit after a
        parent changed (eagerly in between). ``fn``: a built-in name ("copy", "concat", "sum",
        "max", "min", "xor"), ("slice", start, stop), or a callable over typed views. Checked
        whole first: GraphCycleError, UnknownPageError or InvalidPageError, and nothing
        registered. Writes to ``child`` are refused (DerivedPageError) until ``undepend``."""
        encoded = make_fn(fn).encode()
        _unwrap(lambda: ray.get(self.coordinator.depend.remote(
            int(child), [int(p) for p in parents], encoded)))

    def undepend(self, child: int) -> None:
        """``child`` becomes an ordinary page again; its bytes stay."""
        _unwrap(lambda: ray.get(self.coordinator.undepend.remote(int(child))))

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
                "committed": self.committed_epochs(),
                "coordinator": ray.get(self.coordinator.stats.remote()),
                "graph": ray.get(self.coordinator.graph_stats.remote())}

    def close(self) -> None:
        """Drop this client's handles (the runtime keeps running)."""
        self.shards, self.coordinator = [], None


def start(shards: int = 1, data_dir: str | None = None, config: dict | None = None, *,
          namespace: str = "mmsb", address: str | None = None) -> Bus:
    """Start (or reuse) the runtime: a local Ray instance unless Ray is already initialized or an
    ``address`` is given, then the coordinator and ``shards`` shard actors. ``config``: backend
    ("auto", "numpy", "cupy"), fsync ("always", "interval", "none"), prepare_timeout_s,
    auto_commit_s (commit every so many seconds; 0: only explicit commits), gpus_per_shard
    (1: one GPU each; a fraction shares a GPU between shards), checkpoint_uri (a directory or
    pyarrow.fs URI such as s3://bucket/prefix for the shards' checkpoints; None: in data_dir)."""
    config = {"backend": "auto", "fsync": "always", "prepare_timeout_s": 30.0,
              "auto_commit_s": 0.0, "gpus_per_shard": 1.0, "checkpoint_uri": None,
              **(config or {})}
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
        config["auto_commit_s"], namespace, config["gpus_per_shard"], config["checkpoint_uri"])
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
