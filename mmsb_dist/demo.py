"""The demo job: the runtime on an embedded Ray, a realistic workload, a killed shard, and proof
that nothing acknowledged was lost.

Phases (each timed and summarized at the end):

1. Start embedded: a local Ray instance (in this process, shut down at the end), the coordinator
   and ``shards`` shard actors over a fresh data directory (CuPy shards when a GPU is visible, else
   NumPy), and a grid of pages.
2. Ingest: batches of 64-byte cell updates at random cells of random pages (a simulation grid's
   agents writing their records) through ``Bus.write_many``, each acknowledged once durable, with
   a progress bar; commit an epoch every few batches and checkpoint after the second.
3. Kill: ``ray.kill`` one shard actor mid-stream (Ray restarts it; it recovers from its checkpoint
   and log before serving) while the writes continue; the writes sent meanwhile are retried by Ray
   and applied at most once (delta ids).
4. Verify: every page read back equals a NumPy model of every acknowledged write; a read as of the
   checkpointed epoch equals the model at that epoch; ``Bus.replay`` rebuilds every committed epoch
   on every shard and checks its recorded state hash.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

CELL_BYTES = 64
NAMESPACE = "mmsb-demo"

# Bounds of the waits on the runtime (a shard restart takes ~1-3 s here; start-up up to ~20 s).
RECOVERY_TIMEOUT_S = 120.0
READ_CHUNK_PAGES = 1024


@dataclass
class DemoConfig:
    data_dir: str | None = None
    backend: str = "auto"
    shards: int = 2
    pages: int = 4096
    page_bytes: int = 4096
    batches: int = 60
    batch_deltas: int = 20_000
    commit_every: int = 10
    seed: int = 2026


@dataclass
class DemoReport:
    rows: list[tuple[str, str]] = field(default_factory=list)
    ok: bool = True

    def add(self, label: str, value) -> None:
        self.rows.append((label, str(value)))

    def render(self) -> str:
        width = max([len(label) for label, _ in self.rows] + [len("result")])
        lines = [f"  {label:<{width}}  {value}" for label, value in self.rows]
        result = f"  {'result':<{width}}  {'OK' if self.ok else 'FAILED'}"
        return "\n".join(["mmsb-dist demo summary", *lines, result])


def batch_for(cfg: DemoConfig, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch ``seq``: (page indices, cell offsets, payloads), the same for the same seed."""
    rng = np.random.default_rng([cfg.seed, seq])
    n = cfg.batch_deltas
    pages = rng.integers(0, cfg.pages, n)
    cells = rng.integers(0, cfg.page_bytes // CELL_BYTES, n) * CELL_BYTES
    payload = rng.integers(1, 256, (n, CELL_BYTES), dtype=np.uint8)
    return pages, cells, payload


def apply_to_model(model: np.ndarray, pages, cells, payload) -> None:
    """Last writer wins per cell, in batch order (NumPy's own order for repeated fancy-index
    targets is unspecified, so keep only each cell's last write)."""
    cells_per_page = model.shape[1] // CELL_BYTES
    key = pages * cells_per_page + cells // CELL_BYTES
    _, last_rev = np.unique(key[::-1], return_index=True)
    last = key.size - 1 - last_rev
    model.reshape(-1, CELL_BYTES)[key[last]] = payload[last]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=True,
                disable=not sys.stderr.isatty() and os.environ.get("MMSB_PROGRESS") != "1")


def _wait_restarted(actor, pid_before: int, killed_at: float) -> float:
    """Seconds from the kill until the shard answers from a new process (bounded)."""
    import ray

    while time.monotonic() - killed_at < RECOVERY_TIMEOUT_S:
        try:
            if ray.get(actor.ping.remote(), timeout=5.0)["pid"] != pid_before:
                return time.monotonic() - killed_at
        except (ray.exceptions.RayError, TimeoutError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"the killed shard did not come back within {RECOVERY_TIMEOUT_S:g} s")


class _Killer:
    """Kills one shard actor (Ray restarts it) and measures its recovery."""

    def __init__(self, bus, shard: int):
        import ray

        self.actor = bus.shards[shard]
        self.shard = shard
        self.pid = ray.get(self.actor.ping.remote())["pid"]
        ray.kill(self.actor, no_restart=False)
        self.killed_at = time.monotonic()


def ingest(bus, cfg: DemoConfig, ids: np.ndarray, model: np.ndarray, report: DemoReport) -> dict:
    """Write every batch (killing a shard at two thirds), commit and checkpoint on the way."""
    kill_at = max(2, (cfg.batches * 2) // 3)
    out = {"checkpoint": None, "killer": None}
    elapsed = 0.0  # time inside write_many: placement, Arrow, transport, durable acks
    with _progress(cfg.batches, "ingest") as bar:
        for seq in range(1, cfg.batches + 1):
            pages, cells, payload = batch_for(cfg, seq)
            if seq == kill_at:
                out["killer"] = _Killer(bus, cfg.shards - 1)
            start = time.perf_counter()
            bus.write_many(ids[pages], cells, payload)   # returns once durable: acknowledged
            elapsed += time.perf_counter() - start
            apply_to_model(model, pages, cells, payload)
            bar.update(1)
            if seq % cfg.commit_every == 0:
                epoch = bus.commit()
                if out["checkpoint"] is None and epoch >= 2:
                    bus.checkpoint()
                    out["checkpoint"] = (epoch, model.copy())
    deltas = cfg.batches * cfg.batch_deltas
    report.add("ingest", f"{deltas:,} x {CELL_BYTES}-byte writes in {elapsed:.2f} s "
                         f"({deltas / elapsed / 1e6:.2f} M writes/s, durable acks, "
                         f"{cfg.shards} shards)")
    return out


def verify(bus, cfg: DemoConfig, ids, model, checkpoint, report: DemoReport) -> None:
    bad = 0
    for lo in range(0, ids.size, READ_CHUNK_PAGES):
        got = bus.read_many(ids[lo:lo + READ_CHUNK_PAGES])
        bad += sum(not np.array_equal(g, model[lo + i]) for i, g in enumerate(got))
    report.add("pages differing from the acknowledged writes", bad)
    report.ok &= bad == 0
    if checkpoint is not None:
        epoch, at = checkpoint
        got = bus.read_many(ids, epoch=epoch)
        bad_asof = sum(not np.array_equal(g, at[i]) for i, g in enumerate(got))
        report.add(f"time travel to epoch {epoch}: pages differing", bad_asof)
        report.ok &= bad_asof == 0
    committed = bus.committed_epochs()
    replayed = 0
    for epoch in committed:
        hashes = bus.replay(epoch)   # CorruptionError unless every shard reproduces its hash
        replayed += len(hashes) == cfg.shards
    report.add("committed epochs replayed to their hashes", f"{replayed}/{len(committed)} "
                                                            f"(on every shard)")
    report.ok &= replayed == len(committed) and len(committed) > 0


def summarize(bus, report: DemoReport) -> None:
    stats = bus.stats()
    shards = stats["shards"]
    log = sum(s["metrics"]["log_bytes"] for s in shards)
    report.add("shards", ", ".join(f"{s['shard']}: {s['pages']:,} pages ({s['backend']})"
                                   for s in sorted(shards, key=lambda s: s["shard"])))
    report.add("logs", f"{log / 1e6:.1f} MB, fsync {sum(s['metrics']['fsync_seconds'] for s in shards):.2f} s "
                       f"in total")


def run(cfg: DemoConfig) -> DemoReport:
    import ray

    from mmsb_dist import runtime
    from mmsb_dist.backend import gpu_available

    report = DemoReport()
    owned = cfg.data_dir is None
    if cfg.data_dir:  # a fresh directory inside the one given, so runs never mix
        os.makedirs(cfg.data_dir, exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix="mmsb-demo-", dir=cfg.data_dir)
    report.add("data directory", data_dir + (" (temporary)" if owned else ""))
    gpu = cfg.backend == "cupy" or (cfg.backend == "auto" and gpu_available())
    backend = "cupy" if gpu else "numpy"
    started_ray = not ray.is_initialized()
    start = time.perf_counter()
    if started_ray:  # embedded: a local instance of our own, never a cluster that happens to run
        ray.init(address="local", namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=False, num_cpus=max(os.cpu_count() or 1, cfg.shards + 1))
    try:
        bus = runtime.start(cfg.shards, data_dir, namespace=NAMESPACE,
                            config={"backend": backend,
                                    "gpus_per_shard": 1.0 / cfg.shards if gpu else 1.0})
        report.add("start", f"{time.perf_counter() - start:.1f} s (local Ray, coordinator, "
                            f"{cfg.shards} {backend} shards)")
        ids = bus.create_pages(cfg.pages, cfg.page_bytes)
        model = np.zeros((cfg.pages, cfg.page_bytes), np.uint8)
        out = ingest(bus, cfg, ids, model, report)
        killer = out["killer"]
        recovered = _wait_restarted(killer.actor, killer.pid, killer.killed_at)
        report.add("shard killed", f"shard {killer.shard} (ray.kill) mid-stream; back, recovered "
                                   f"from checkpoint + log within {recovered:.1f} s")
        final = bus.commit()
        report.add("final epoch", final)
        verify(bus, cfg, ids, model, out["checkpoint"], report)
        summarize(bus, report)
    finally:
        runtime.stop(namespace=NAMESPACE)
        if started_ray:
            ray.shutdown()
        if owned:
            shutil.rmtree(data_dir, ignore_errors=True)
    return report
