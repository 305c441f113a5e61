"""The coordinator's epoch protocol: a two-phase barrier, as a state machine with a thin shell.

:class:`EpochProtocol` decides; it does no I/O, reads no clock and knows nothing of Ray. It takes
events (``begin``, ``prepared``, ``shard_failed``, ``tick(now)``, ``decision_recorded``,
``commit_acked``) and returns instructions for its shell to carry out, in order:

1. ``Prepare(epoch, shards)``: ask every shard to seal ``epoch`` (ShardEngine.seal): each logs its
   LSN cut and state hash durably and reports them (``prepared``). Writes keep flowing meanwhile;
   they belong to the next epoch.
2. ``RecordDecision(epoch, cuts)``: once every shard reported, write the decision durably (the
   :class:`DecisionLog`), then feed ``decision_recorded``. Epoch ``e`` is committed iff its decision
   is recorded; from then on it never changes.
3. ``Commit(epoch, shards)``: tell the shards (``commit_acked`` each); ``Committed(epoch)`` when all
   have acknowledged, for whoever waits on the commit.

``Abort(epoch, shards, reason)`` ends an attempt that cannot finish (a shard failed, or the
deadline passed before the decision). Nothing is undone: an aborted epoch's seals stay in the shard
logs but no decision names them, so no reader ever sees that epoch; the next attempt takes the next
number. Epoch numbers only increase. A restarted coordinator rebuilds the machine from its decision
log (:meth:`EpochProtocol.recover`): an attempt without a decision is aborted, a recorded decision
whose commits were not all acknowledged is re-driven.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmsb_dist.errors import EpochError
from mmsb_dist.formats import pack_control, unpack_control

__all__ = ["EpochProtocol", "DecisionLog", "Prepare", "RecordDecision", "Commit", "Abort",
           "Committed"]


@dataclass(frozen=True)
class Prepare:
    epoch: int
    shards: tuple[int, ...]


@dataclass(frozen=True)
class RecordDecision:
    epoch: int
    cuts: dict  # shard -> (LSN cut, state hash)


@dataclass(frozen=True)
class Commit:
    epoch: int
    shards: tuple[int, ...]


@dataclass(frozen=True)
class Abort:
    epoch: int
    shards: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class Committed:
    epoch: int


@dataclass
class _Attempt:
    epoch: int
    deadline: float
    reports: dict = field(default_factory=dict)  # shard -> (cut, hash)
    decided: bool = False
    acked: set = field(default_factory=set)


class EpochProtocol:
    """See the module docstring. ``shards``: the shard indices taking part; ``prepare_timeout_s``:
    how long an attempt may wait for every shard's report (time comes in through ``now``)."""

    def __init__(self, shards, *, prepare_timeout_s: float = 30.0, last_epoch: int = 0,
                 committed: dict | None = None):
        self.shards = tuple(sorted(int(s) for s in shards))
        if not self.shards:
            raise ValueError("an epoch protocol needs at least one shard")
        self.prepare_timeout_s = float(prepare_timeout_s)
        self.last_epoch = int(last_epoch)        # the highest number ever attempted
        self.committed: dict[int, dict] = dict(committed or {})  # epoch -> cuts
        self.attempt: _Attempt | None = None

    @property
    def last_committed(self) -> int:
        return max(self.committed, default=0)

    def begin(self, now: float) -> list:
        """Start closing the open epoch. Refused while an attempt is in flight."""
        if self.attempt is not None:
            raise EpochError(f"epoch {self.attempt.epoch} is still being committed")
        self.last_epoch += 1
        self.attempt = _Attempt(self.last_epoch, now + self.prepare_timeout_s)
        return [Prepare(self.last_epoch, self.shards)]

    def prepared(self, shard: int, epoch: int, cut: int, state_hash: int) -> list:
        """A shard sealed ``epoch``. Reports for another epoch, or repeated ones, change nothing."""
        a = self.attempt
        if a is None or a.epoch != epoch or a.decided or shard not in self.shards:
            return []
        a.reports.setdefault(int(shard), (int(cut), int(state_hash)))
        if len(a.reports) < len(self.shards):
            return []
        return [RecordDecision(epoch, dict(a.reports))]

    def decision_recorded(self, epoch: int) -> list:
        """The decision for ``epoch`` is durable: the epoch is committed."""
        a = self.attempt
        if a is None or a.epoch != epoch or len(a.reports) < len(self.shards):
            raise EpochError(f"no complete decision for epoch {epoch} to record")
        a.decided = True
        self.committed[epoch] = dict(a.reports)
        return [Commit(epoch, self.shards)]

    def commit_acked(self, shard: int, epoch: int) -> list:
        a = self.attempt
        if a is None or a.epoch != epoch or not a.decided:
            return []
        a.acked.add(int(shard))
        if a.acked >= set(self.shards):
            self.attempt = None
            return [Committed(epoch)]
        return []

    def shard_failed(self, shard: int, now: float) -> list:
        """A shard is gone (actor died, call failed). Before the decision the attempt is aborted;
        after it the commit stands and is re-driven to the restarted shard."""
        a = self.attempt
        if a is None or shard not in self.shards:
            return []
        if a.decided:
            return [Commit(a.epoch, (int(shard),))]
        return self._abort(f"shard {shard} failed during prepare")

    def tick(self, now: float) -> list:
        a = self.attempt
        if a is not None and not a.decided and now >= a.deadline:
            missing = sorted(set(self.shards) - set(a.reports))
            return self._abort(f"shards {missing} did not report within "
                               f"{self.prepare_timeout_s:g} s")
        return []

    def _abort(self, reason: str) -> list:
        a, self.attempt = self.attempt, None
        return [Abort(a.epoch, self.shards, reason)]

    # ---- restart ----------------------------------------------------------------------------------

    @classmethod
    def recover(cls, shards, records, *, now: float, prepare_timeout_s: float = 30.0):
        """Rebuild from the decision log's records; returns (protocol, instructions to carry out)."""
        proto = cls(shards, prepare_timeout_s=prepare_timeout_s)
        attempted, decided_last, acked = 0, None, set()
        for rec in records:
            if rec["k"] == "attempt":
                attempted = max(attempted, rec["epoch"])
            elif rec["k"] == "decide":
                cuts = {int(s): (c, h) for s, c, h in rec["cuts"]}
                proto.committed[rec["epoch"]] = cuts
                decided_last, acked = rec["epoch"], set()
            elif rec["k"] == "committed" and rec["epoch"] == decided_last:
                decided_last = None
        proto.last_epoch = max(attempted, proto.last_committed)
        out = []
        if decided_last is not None:  # committed, but not every shard has heard: re-drive
            proto.attempt = _Attempt(decided_last, now, dict(proto.committed[decided_last]), True,
                                     acked)
            out.append(Commit(decided_last, proto.shards))
        elif attempted > proto.last_committed:  # an attempt died before its decision
            out.append(Abort(attempted, proto.shards, "coordinator restarted during prepare"))
        return proto, out


class DecisionLog:
    """The coordinator's durable record (a LogPartition of msgpack records, fsync always):
    ``attempt`` before PREPARE goes out, ``decide`` (the cuts) before COMMIT, ``committed`` once
    every shard acknowledged. Recovery replays it into :meth:`EpochProtocol.recover`."""

    def __init__(self, path):
        from mmsb_dist.log import LogPartition

        self.log = LogPartition(path, fsync="always")

    def records(self) -> list[dict]:
        return [unpack_control(bytes(f.payload)) for f in self.log.read(0)]

    def attempt(self, epoch: int) -> None:
        self._append("attempt", epoch=epoch)

    def decide(self, epoch: int, cuts: dict) -> None:
        self._append("decide", epoch=epoch,
                     cuts=[[int(s), int(c), int(h)] for s, (c, h) in sorted(cuts.items())])

    def committed(self, epoch: int) -> None:
        self._append("committed", epoch=epoch)

    def _append(self, kind: str, **fields) -> None:
        self.log.append(pack_control(kind, **fields), epoch=int(fields["epoch"]), lsn_count=1)

    def close(self) -> None:
        self.log.close()
