"""Helpers for the Ray fault and multi-node tests: bounded waits, a per-byte write model, a
background writer that records what was acknowledged, and a book of committed epochs.

The oracle is deliberately plain: every acknowledged ``write_many`` batch is kept, in the order the
single writer sent them, and the expected bytes of every page after the first ``k`` batches are
rebuilt one 64-byte run at a time (last writer wins, in batch order). Because one thread writes and
waits for each batch before sending the next, a shard's state at any seal is that shard's part of
the first ``k`` batches for some ``k``: that is what a consistent cut means here, and what
:meth:`EpochBook.record` checks.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import ray

from mmsb_dist.placement import shards_of

CALL_TIMEOUT_S = 60.0   # any single Ray call, a restart included (a restart takes ~1-3 s here)
WRITE_BYTES = 64        # every write is one 64-byte run of non-zero bytes


# ---- bounded waits -------------------------------------------------------------------------------

def bounded(fn, *args, timeout_s: float = CALL_TIMEOUT_S, what: str = "call"):
    """``fn(*args)`` in a daemon thread, at most ``timeout_s``: for client calls (``Bus``) that
    block on ``ray.get`` without a timeout of their own."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True, name=f"bounded:{what}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise AssertionError(f"{what} did not return within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def wait_until(probe, *, timeout_s: float, what: str, interval_s: float = 0.1):
    """Call ``probe()`` until it returns something truthy (Ray errors count as "not yet")."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            got = probe()
            if got:
                return got
        except (ray.exceptions.RayError, TimeoutError) as exc:
            last = exc
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s:g} s (last error: {last!r})")


def ping_all(bus, timeout_s: float = 5.0) -> list[dict]:
    return ray.get([s.ping.remote() for s in bus.shards], timeout=timeout_s)


def wait_coordinator(bus, timeout_s: float = CALL_TIMEOUT_S) -> dict:
    return ray.get(bus.coordinator.info.remote(), timeout=timeout_s)


def commit(bus, timeout_s: float = CALL_TIMEOUT_S) -> int:
    return ray.get(bus.coordinator.commit.remote(), timeout=timeout_s)


def committed_cuts(bus, timeout_s: float = CALL_TIMEOUT_S) -> dict:
    return ray.get(bus.coordinator.committed.remote(), timeout=timeout_s)


# ---- the write model -----------------------------------------------------------------------------

def random_batch(rng, ids: np.ndarray, n: int, page_bytes: int):
    pids = ids[rng.integers(0, ids.size, n)]
    offs = rng.integers(0, page_bytes - WRITE_BYTES + 1, n)
    data = rng.integers(1, 256, (n, WRITE_BYTES), dtype=np.uint8)
    return pids, offs, data


class WriteLog:
    """Every batch one writer sent, in order; ``acked`` of them were acknowledged (returned).
    ``state_at(k)``: the expected bytes of every page after the first ``k`` batches."""

    def __init__(self, ids: np.ndarray, page_bytes: int, shards: int):
        self.ids = np.asarray(ids, dtype=np.uint64)
        self.page_bytes = page_bytes
        self.row = {int(p): r for r, p in enumerate(self.ids)}
        self.owner = shards_of(self.ids, shards)
        self.batches: list[tuple] = []   # sent (started); only the first `acked` returned
        self.acked = 0
        self._cache = {0: np.zeros((self.ids.size, page_bytes), np.uint8)}

    @property
    def started(self) -> int:
        return len(self.batches)

    def state_at(self, k: int) -> np.ndarray:
        assert 0 <= k <= self.acked, f"batch {k} was never acknowledged (acked: {self.acked})"
        k0 = max(c for c in self._cache if c <= k)
        state = self._cache[k0].copy()
        for i in range(k0, k):
            self.apply(state, i)
        self._cache[k] = state.copy()
        return state

    def apply(self, state: np.ndarray, i: int) -> None:
        """Batch ``i`` onto ``state``, one run at a time, in order: the last one wins."""
        pids, offs, data = self.batches[i]
        for p, o, d in zip(pids, offs, data):
            state[self.row[int(p)], o:o + WRITE_BYTES] = d

    def write(self, bus, pids, offs, data) -> None:
        """One acknowledged batch from the calling thread (the only writer at that time)."""
        self.batches.append((pids, offs, data))
        bus.write_many(pids, offs, data)
        self.acked += 1

    def check_live(self, bus, what: str) -> None:
        """Every page equals the model of every acknowledged batch (the writer must be idle)."""
        assert self.acked == self.started, f"{what}: a batch is still in flight"
        want = self.state_at(self.acked)
        got = bounded(bus.read_many, self.ids, what=f"{what}: read_many")
        bad = [int(p) for r, p in enumerate(self.ids) if not np.array_equal(got[r], want[r])]
        assert not bad, (f"{what}: {len(bad)} pages differ from the {self.acked} acknowledged "
                         f"batches (acknowledged writes lost or wrong), e.g. page {bad[0]}")


class Writer(threading.Thread):
    """Keeps sending ``write_many`` batches through ``log`` until stopped; ``pause()`` returns once
    the batch in flight is acknowledged. An exception from ``write_many`` ends the thread and is
    re-raised by ``pause``/``stop``: with actor restarts, writes must not fail."""

    def __init__(self, bus, log: WriteLog, seed: int, *, batch_deltas: int = 128,
                 max_batches: int = 3000, gap_s: float = 0.001):
        super().__init__(daemon=True, name=f"writer-{seed}")
        self.bus, self.log = bus, log
        self.rng = np.random.default_rng(seed)
        self.batch_deltas, self.max_batches, self.gap_s = batch_deltas, max_batches, gap_s
        self.error: BaseException | None = None
        self._halt, self._pause = threading.Event(), threading.Event()
        self._idle = threading.Event()

    def run(self) -> None:
        try:
            for _ in range(self.max_batches):
                if self._halt.is_set():
                    break
                if self._pause.is_set():
                    self._idle.set()
                    while self._pause.is_set() and not self._halt.is_set():
                        time.sleep(0.005)
                    self._idle.clear()
                    continue
                self.log.write(self.bus, *random_batch(self.rng, self.log.ids, self.batch_deltas,
                                                       self.log.page_bytes))
                time.sleep(self.gap_s)
        except BaseException as exc:
            self.error = exc
        finally:
            self._idle.set()

    def _raise(self, what: str) -> None:
        if self.error is not None:
            raise AssertionError(f"{what}: write_many raised {self.error!r} (batch "
                                 f"{self.log.started} unacknowledged)") from self.error

    def wait_progress(self, batches: int, what: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        """Block until ``batches`` more batches were acknowledged."""
        goal = self.log.acked + batches
        wait_until(lambda: self.log.acked >= goal or self.error is not None or not self.is_alive(),
                   timeout_s=timeout_s, what=f"{what}: {batches} more acknowledged batches")
        self._raise(what)
        assert self.log.acked >= goal, f"{what}: the writer stopped at batch {self.log.acked}"

    def pause(self, what: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._pause.set()
        if not self._idle.wait(timeout_s):
            raise AssertionError(f"{what}: write_many in flight for over {timeout_s:g} s")
        self._raise(what)

    def resume(self) -> None:
        self._pause.clear()

    def stop(self, what: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._halt.set()
        self.join(timeout_s)
        assert not self.is_alive(), f"{what}: write_many in flight for over {timeout_s:g} s"
        self._raise(what)


# ---- committed epochs ----------------------------------------------------------------------------

class EpochBook:
    """What the tests learned about epochs: the committed list seen last, the bytes of every page
    at each committed epoch (read right after its commit), and the numbers that were skipped
    (attempted, never committed: they must never appear later)."""

    def __init__(self, bus, log: WriteLog):
        self.bus, self.log = bus, log
        self.seen: list[int] = []
        self.pages: dict[int, list[np.ndarray]] = {}
        self.skipped: set[int] = set()

    def observe(self, what: str) -> list[int]:
        """The committed epochs now; checks they only grew and stay strictly increasing."""
        now = sorted(committed_cuts(self.bus))
        assert all(a < b for a, b in zip(now, now[1:])), f"{what}: epochs {now} not increasing"
        assert now[:len(self.seen)] == self.seen, (f"{what}: committed epochs went from "
                                                   f"{self.seen} to {now} (not only grew)")
        assert not self.skipped & set(now), (f"{what}: epochs {sorted(self.skipped & set(now))} "
                                             "were skipped (not committed) but appear now")
        if now:
            self.skipped |= set(range(1, now[-1])) - set(now)
        self.seen = now
        return now

    def record(self, epoch: int, lo: int, hi: int, what: str) -> None:
        """Epoch ``epoch`` was committed by a commit sent after ``lo`` batches were acknowledged
        and answered before batch ``hi`` was sent: on every shard it must hold that shard's part of
        the first ``k`` batches for one ``k`` in ``[lo, hi]``."""
        got = bounded(self.bus.read_many, self.log.ids, epoch, what=f"{what}: read as of {epoch}")
        got_rows = np.stack(got)
        wait_until(lambda: self.log.acked >= hi, timeout_s=CALL_TIMEOUT_S,
                   what=f"{what}: batches up to {hi} acknowledged")
        state, todo = self.log.state_at(lo), set(np.unique(self.log.owner).tolist())
        for k in range(lo, hi + 1):
            if k > lo:
                self.log.apply(state, k - 1)
            todo = {s for s in todo if not np.array_equal(state[self.log.owner == s],
                                                          got_rows[self.log.owner == s])}
            if not todo:
                break
        assert not todo, (f"{what}: shards {sorted(todo)} at epoch {epoch} do not hold the first "
                          f"k acknowledged batches for any k in [{lo}, {hi}] (a write "
                          "acknowledged before the commit is missing, or the cut is not "
                          "consistent)")
        self.pages[epoch] = got

    def verify(self, what: str) -> None:
        """Every recorded epoch still reads the same and replays to its recorded hash on every
        shard; the committed list only grew."""
        self.observe(what)
        cuts = committed_cuts(self.bus)
        for epoch, pages in self.pages.items():
            assert epoch in cuts, f"{what}: committed epoch {epoch} disappeared"
            got = bounded(self.bus.read_many, self.log.ids, epoch,
                          what=f"{what}: read as of {epoch}")
            bad = [int(p) for p, a, b in zip(self.log.ids, got, pages) if not np.array_equal(a, b)]
            assert not bad, f"{what}: committed epoch {epoch} changed on pages {bad[:5]}"
        for epoch in cuts:
            bounded(self.bus.replay, epoch, what=f"{what}: replay({epoch})")
            hashes = ray.get([s.replay_hash.remote(int(epoch)) for s in self.bus.shards],
                             timeout=CALL_TIMEOUT_S)
            want = [cuts[epoch][s][1] for s in range(len(self.bus.shards))]
            assert hashes == want, f"{what}: per-shard replay of epoch {epoch}: {hashes} != {want}"
