"""The demo job: a realistic workload on one embedded shard, a crash, and proof that nothing was lost.

Phases (each timed and summarized at the end):

1. Start an embedded shard (ShardEngine: log + checkpoints in a data directory; CuPy when a GPU is
   visible, else the NumPy backend) and create a grid of pages.
2. Ingest: batches of 64-byte cell updates (a simulation grid's agents writing their records),
   with a progress bar; seal an epoch every few batches and checkpoint one epoch in the middle.
3. Crash: a child process reopens the shard, keeps writing and acknowledging batches, and is killed
   with SIGKILL while it writes.
4. Recover: reopen the shard (checkpoint + log replay), check that every batch the child
   acknowledged is there, and replay every sealed epoch to its recorded state hash.

Every batch is rebuilt from its delta id (client, seq), so the checks need no copy of the data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from mmsb_dist.delta import DeltaBatch

CELL_BYTES = 64
CLIENT_PARENT, CLIENT_CHILD = 1, 2


@dataclass
class DemoConfig:
    data_dir: str | None = None
    backend: str = "auto"
    pages: int = 16384
    page_bytes: int = 4096
    batches: int = 120
    batch_deltas: int = 10_000
    seal_every: int = 10
    crash_after_acks: int = 20
    seed: int = 2026


@dataclass
class DemoReport:
    rows: list[tuple[str, str]] = field(default_factory=list)
    ok: bool = True

    def add(self, label: str, value) -> None:
        self.rows.append((label, str(value)))

    def render(self) -> str:
        width = max(len(label) for label, _ in self.rows)
        lines = [f"  {label:<{width}}  {value}" for label, value in self.rows]
        result = f"  {'result':<{width}}  {'OK' if self.ok else 'FAILED'}"
        return "\n".join(["mmsb-dist demo summary", *lines, result])


def batch_for(cfg: DemoConfig, client: int, seq: int) -> DeltaBatch:
    """Batch ``seq`` of ``client``: ``batch_deltas`` cell updates at random cells of random pages."""
    rng = np.random.default_rng([cfg.seed, client, seq])
    n = cfg.batch_deltas
    pages = rng.integers(0, cfg.pages, n).astype(np.uint64)
    cells = rng.integers(0, cfg.page_bytes // CELL_BYTES, n) * CELL_BYTES
    payload = rng.integers(1, 256, (n, CELL_BYTES), dtype=np.uint8)
    return DeltaBatch.runs(pages, cells, payload, client_id=client, seq=seq)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=True,
                disable=not sys.stderr.isatty() and os.environ.get("MMSB_PROGRESS") != "1")


def ingest(engine, cfg: DemoConfig, report: DemoReport) -> None:
    elapsed = 0.0  # time inside the engine: validate, log (fsync), apply; not making up the data
    with _progress(cfg.batches, "ingest") as bar:
        for seq in range(1, cfg.batches + 1):
            batch = batch_for(cfg, CLIENT_PARENT, seq)
            start = time.perf_counter()
            engine.apply(batch)
            elapsed += time.perf_counter() - start
            bar.update(1)
            if seq % cfg.seal_every == 0:
                seal = engine.seal()
                if seal.epoch == 2:
                    engine.checkpoint()
    deltas = cfg.batches * cfg.batch_deltas
    report.add("ingest", f"{deltas:,} deltas in {elapsed:.2f} s "
                         f"({deltas / elapsed / 1e6:.2f} M deltas/s, durable acks)")
    report.add("epochs sealed", engine.last_sealed)


def crash_child(data_dir: str, cfg: DemoConfig) -> None:
    """Run in the child: keep writing until killed, one ``ack SEQ`` line per durable batch."""
    from mmsb_dist.engine import ShardEngine

    engine = ShardEngine(data_dir, backend=cfg.backend)
    print("ready", flush=True)
    seq = 0
    while True:
        seq += 1
        engine.apply(batch_for(cfg, CLIENT_CHILD, seq))
        print("ack", seq, flush=True)


def crash(data_dir: str, cfg: DemoConfig, report: DemoReport) -> set[int]:
    """Start a writer process on the shard and SIGKILL it mid-stream; returns the acked seqs."""
    argv = [sys.executable, "-c", "import sys, mmsb_dist.demo as d; "
            f"d.crash_child(sys.argv[1], d.DemoConfig(**{cfg.__dict__!r}))", data_dir]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    acked: set[int] = set()
    deadline = time.monotonic() + 120
    for line in child.stdout:
        if line.startswith("ack "):
            acked.add(int(line.split()[1]))
            if len(acked) >= cfg.crash_after_acks:
                break
        if time.monotonic() > deadline:
            break
    os.killpg(child.pid, signal.SIGKILL)
    tail = child.stdout.read()  # lines printed before death are acknowledgements too
    acked.update(int(x.split()[1]) for x in tail.splitlines() if x.startswith("ack "))
    child.wait()
    report.add("crash", f"writer killed with SIGKILL after {len(acked)} acknowledged batches "
                        f"(exit {child.returncode})")
    return acked


def recover_and_verify(data_dir: str, cfg: DemoConfig, acked: set[int], report: DemoReport,
                       parent_batches: int) -> None:
    from mmsb_dist.engine import ShardEngine
    from mmsb_dist.formats import decode_deltas

    start = time.perf_counter()
    engine = ShardEngine(data_dir, backend=cfg.backend)
    report.add("recovery", f"{time.perf_counter() - start:.2f} s (checkpoint + log replay"
                           + (", torn tail truncated" if engine.log.recovery else "") + ")")
    logged = {CLIENT_PARENT: 0, CLIENT_CHILD: set()}
    for frame in engine.log.read(0):
        if bytes(frame.payload[:4]) == b"\xff\xff\xff\xff":
            b = decode_deltas(frame.payload)
            if b.client_id == CLIENT_CHILD:
                logged[CLIENT_CHILD].add(b.seq)
            else:
                logged[CLIENT_PARENT] += 1
    lost = acked - logged[CLIENT_CHILD]
    report.add("acknowledged batches lost", len(lost))
    report.ok &= not lost and logged[CLIENT_PARENT] == parent_batches
    mismatched = [s.epoch for s in engine.seals() if engine.replay(s.epoch).state_hash() != s.state_hash]
    report.add("sealed epochs replayed to their hash", f"{len(engine.seals()) - len(mismatched)}"
                                                       f"/{len(engine.seals())}")
    report.ok &= not mismatched
    seal = engine.seal()  # the recovered state, including the child's batches, as a new epoch
    report.add("final epoch", f"{seal.epoch} (state hash {seal.state_hash:016x})")
    stats = engine.statistics()
    report.add("pages", f"{stats['pages']:,} x {cfg.page_bytes} B on the {stats['backend']} backend")
    segments = engine.log.segments()
    report.add("log", f"{sum(s.bytes for s in segments) / 1e6:.1f} MB in {len(segments)} "
                      f"segment(s), next LSN {engine.log.next_lsn:,}")
    engine.close()


def warm_up(backend: str, report: DemoReport) -> None:
    """Compile the kernels once on a tiny shard (numba caches them on disk; NVRTC per process), so
    the timed phases measure the engine, not the compiler."""
    import shutil

    from mmsb_dist.engine import ShardEngine

    start = time.perf_counter()
    path = tempfile.mkdtemp(prefix="mmsb-warmup-")
    try:
        from mmsb_dist import limits

        # Large enough to take the threaded paths too (they are compiled separately).
        tiny = DemoConfig(pages=4, page_bytes=256, batch_deltas=limits.cpu_parallel_runs_min + 1)
        with ShardEngine(path, backend=backend) as engine:
            engine.create_pages(tiny.pages, tiny.page_bytes)
            engine.apply(batch_for(tiny, CLIENT_PARENT, 1))
            engine.apply(DeltaBatch.masked_deltas([0], [0], [b"\x0f"], [b"abcdefgh"]))
            engine.seal()
            engine.checkpoint()
            engine.apply(batch_for(tiny, CLIENT_PARENT, 2))
            engine.seal()
        with ShardEngine(path, backend=backend) as engine:  # recovery: checkpoint + log
            engine.replay(2)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    report.add("kernel warm-up", f"{time.perf_counter() - start:.2f} s (compiles on first run, "
                                 "cached afterwards)")


def run(cfg: DemoConfig) -> DemoReport:
    from mmsb_dist.engine import ShardEngine

    report = DemoReport()
    owned = cfg.data_dir is None
    if cfg.data_dir:  # a fresh shard directory inside the one given, so runs never mix
        os.makedirs(cfg.data_dir, exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix="mmsb-demo-", dir=cfg.data_dir)
    report.add("data directory", data_dir + (" (temporary)" if owned else ""))
    warm_up(cfg.backend, report)
    engine = ShardEngine(data_dir, backend=cfg.backend)
    cfg.backend = engine.backend.name
    if engine.arena.page_count == 0:
        engine.create_pages(cfg.pages, cfg.page_bytes)
    ingest(engine, cfg, report)
    engine.close()
    acked = crash(data_dir, cfg, report)
    recover_and_verify(data_dir, cfg, acked, report, cfg.batches)
    if owned:
        import shutil
        shutil.rmtree(data_dir, ignore_errors=True)
    return report
