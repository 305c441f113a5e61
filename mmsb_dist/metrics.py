"""The runtime's metrics, through ``ray.util.metrics`` (Ray exports them to Prometheus).

Every metric carries the tags ``namespace`` and (for shards) ``shard``. Ray prefixes the names
with ``ray_`` on its Prometheus endpoint (``http://<node>:<metrics_export_port>/metrics``);
counters appear there with the ``_total`` suffix Prometheus gives them.

| metric | kind | what |
| --- | --- | --- |
| ``mmsb_writes`` | counter | deltas applied (acknowledged, duplicates excluded) |
| ``mmsb_write_bytes`` | counter | payload bytes of those deltas |
| ``mmsb_batch_deltas`` | histogram | deltas per applied batch |
| ``mmsb_apply_seconds`` | histogram | validate + log (durable) + apply of one batch |
| ``mmsb_log_bytes`` | gauge | bytes of the shard's log on disk |
| ``mmsb_fsync_seconds`` | counter | time spent in fsync by the shard's log |
| ``mmsb_fsyncs`` | counter | fsync calls of the shard's log |
| ``mmsb_replay_lag_lsns`` | gauge | LSNs after the newest checkpoint: what a restart replays |
| ``mmsb_pages`` / ``mmsb_page_bytes`` | gauge | live pages of the shard and their bytes |
| ``mmsb_open_epoch`` | gauge | the epoch the shard's new writes belong to |
| ``mmsb_commit_seconds`` | histogram | one two-phase commit, PREPARE to COMMITTED |
| ``mmsb_commits`` / ``mmsb_commit_aborts`` | counter | committed and aborted attempts |
| ``mmsb_committed_epoch`` | gauge | the last committed epoch |

``Bus.stats()`` and ``mmsb-dist status`` show the same numbers: each actor keeps the totals it
reports to Ray (``ShardMetrics.totals()``, ``CoordinatorMetrics.totals()``).
"""

from __future__ import annotations

import time

# Gauges that need a look at the disk (log size, newest checkpoint) are refreshed at most this
# often on the write path; seal, checkpoint and stats refresh them at once. A look costs a
# directory listing (~0.1 ms), negligible once per second, not once per batch.
GAUGE_REFRESH_S = 1.0

_BATCH_BOUNDS = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000]
_SECONDS_BOUNDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10]

_metrics: dict | None = None


def _defined() -> dict:
    """The metric objects, made once per process (Ray registers them by name)."""
    global _metrics
    if _metrics is None:
        from ray.util.metrics import Counter, Gauge, Histogram

        shard_tags, coord_tags = ("namespace", "shard"), ("namespace",)
        _metrics = {
            "writes": Counter("mmsb_writes", "deltas applied", tag_keys=shard_tags),
            "write_bytes": Counter("mmsb_write_bytes", "payload bytes applied",
                                   tag_keys=shard_tags),
            "batch_deltas": Histogram("mmsb_batch_deltas", "deltas per applied batch",
                                      boundaries=_BATCH_BOUNDS, tag_keys=shard_tags),
            "apply_seconds": Histogram("mmsb_apply_seconds",
                                       "validate + durable log + apply of one batch",
                                       boundaries=_SECONDS_BOUNDS, tag_keys=shard_tags),
            "log_bytes": Gauge("mmsb_log_bytes", "bytes of the shard's log on disk",
                               tag_keys=shard_tags),
            "fsync_seconds": Counter("mmsb_fsync_seconds", "seconds spent in fsync by the log",
                                     tag_keys=shard_tags),
            "fsyncs": Counter("mmsb_fsyncs", "fsync calls of the log", tag_keys=shard_tags),
            "replay_lag_lsns": Gauge("mmsb_replay_lag_lsns",
                                     "log LSNs after the newest checkpoint", tag_keys=shard_tags),
            "pages": Gauge("mmsb_pages", "live pages", tag_keys=shard_tags),
            "page_bytes": Gauge("mmsb_page_bytes", "bytes of live pages", tag_keys=shard_tags),
            "open_epoch": Gauge("mmsb_open_epoch", "epoch of new writes", tag_keys=shard_tags),
            "commit_seconds": Histogram("mmsb_commit_seconds", "one two-phase commit",
                                        boundaries=_SECONDS_BOUNDS, tag_keys=coord_tags),
            "commits": Counter("mmsb_commits", "committed epochs", tag_keys=coord_tags),
            "commit_aborts": Counter("mmsb_commit_aborts", "aborted commit attempts",
                                     tag_keys=coord_tags),
            "committed_epoch": Gauge("mmsb_committed_epoch", "last committed epoch",
                                     tag_keys=coord_tags),
        }
    return _metrics


class ShardMetrics:
    """One shard actor's metrics and the totals behind them (since the actor process started)."""

    def __init__(self, namespace: str, shard: int, engine):
        self.tags = {"namespace": namespace, "shard": str(shard)}
        self.engine = engine
        self.m = _defined()
        self.writes = self.write_bytes = self.batches = 0
        self.apply_seconds = 0.0
        self._fsyncs_seen, self._fsync_seconds_seen = 0, 0.0
        self._checkpoint_lsn, self._checkpoint_epoch = self._newest_checkpoint()
        self._gauges: dict = {}
        self._refreshed = float("-inf")
        self.refresh()

    def _newest_checkpoint(self) -> tuple[int, int]:
        from mmsb_dist import checkpoint as ckpt

        info = ckpt.latest_checkpoint(self.engine.checkpoints, self.engine.shard, None,
                                      filesystem=self.engine._fs)
        return (0, 0) if info is None else (info.lsn, info.epoch)

    def applied(self, deltas: int, nbytes: int, seconds: float) -> None:
        """One batch applied (``deltas`` 0 for a duplicate: only its time counts)."""
        if deltas:
            self.writes += deltas
            self.write_bytes += nbytes
            self.batches += 1
            self.m["writes"].inc(deltas, tags=self.tags)
            self.m["write_bytes"].inc(nbytes, tags=self.tags)
            self.m["batch_deltas"].observe(deltas, tags=self.tags)
        self.apply_seconds += seconds
        self.m["apply_seconds"].observe(seconds, tags=self.tags)
        if time.monotonic() - self._refreshed >= GAUGE_REFRESH_S:
            self.refresh()

    def checkpointed(self, lsn: int, epoch: int) -> None:
        if lsn >= self._checkpoint_lsn:
            self._checkpoint_lsn, self._checkpoint_epoch = lsn, epoch
        self.refresh()

    def refresh(self) -> dict:
        """Read the engine's statistics, set the gauges and fsync counters; returns the numbers."""
        self._refreshed = time.monotonic()
        stats = self.engine.statistics()
        log = stats["log"]
        fsyncs, fsync_s = log.get("fsyncs", 0), log.get("fsync_seconds", 0.0)
        if fsyncs > self._fsyncs_seen:
            self.m["fsyncs"].inc(fsyncs - self._fsyncs_seen, tags=self.tags)
        if fsync_s > self._fsync_seconds_seen:
            self.m["fsync_seconds"].inc(fsync_s - self._fsync_seconds_seen, tags=self.tags)
        self._fsyncs_seen, self._fsync_seconds_seen = fsyncs, fsync_s
        gauges = {
            "log_bytes": sum(s.bytes for s in self.engine.log.segments()),
            "replay_lag_lsns": max(0, stats["next_lsn"] - self._checkpoint_lsn),
            "pages": stats["pages"],
            "page_bytes": stats["page_bytes"],
            "open_epoch": stats["open_epoch"],
        }
        for name, value in gauges.items():
            self.m[name].set(value, tags=self.tags)
        self._gauges = gauges
        return gauges

    def totals(self) -> dict:
        """The numbers behind the metrics, fresh (what ``Bus.stats()`` and ``status`` show)."""
        gauges = self.refresh()
        return {"writes": self.writes, "write_bytes": self.write_bytes, "batches": self.batches,
                "apply_seconds": self.apply_seconds, "fsyncs": self._fsyncs_seen,
                "fsync_seconds": self._fsync_seconds_seen, **gauges,
                "checkpoint_epoch": self._checkpoint_epoch,
                "checkpoint_lsn": self._checkpoint_lsn}


class CoordinatorMetrics:
    """The coordinator's commit metrics and their totals (since its process started)."""

    def __init__(self, namespace: str, last_committed: int):
        self.tags = {"namespace": namespace}
        self.m = _defined()
        self.commits = self.aborts = 0
        self.commit_seconds = 0.0
        self.last_commit_seconds = None
        self.last_committed = last_committed
        self.m["committed_epoch"].set(last_committed, tags=self.tags)

    def committed(self, epoch: int, seconds: float) -> None:
        self.commits += 1
        self.commit_seconds += seconds
        self.last_commit_seconds = seconds
        self.last_committed = max(self.last_committed, int(epoch))
        self.m["commits"].inc(1, tags=self.tags)
        self.m["commit_seconds"].observe(seconds, tags=self.tags)
        self.m["committed_epoch"].set(self.last_committed, tags=self.tags)

    def aborted(self) -> None:
        self.aborts += 1
        self.m["commit_aborts"].inc(1, tags=self.tags)

    def totals(self) -> dict:
        return {"commits": self.commits, "commit_aborts": self.aborts,
                "commit_seconds": self.commit_seconds,
                "last_commit_seconds": self.last_commit_seconds,
                "last_committed": self.last_committed}
