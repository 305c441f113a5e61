"""Which batches a shard has applied, by delta id (client id, seq), so that a batch sent twice (a
call Ray re-sends to a restarted shard, a client's retry) applies at most once.

A client numbers its batches 1, 2, 3, ... across every shard. A shard cannot assume that it sees
one client's batches in that order: a client may have several in flight (the gateway answers
concurrent requests through one client; a shard runs writes on several threads), and Ray re-sends
the calls in flight to a restarted shard in no particular order. So a shard keeps, per client, the
highest seq it applied and a bitmap of which of the ``window`` seqs below it it applied. A batch
more than ``window`` seqs below the highest one is taken as applied (a duplicate): the client
would have had to send ``window`` batches after it while it was still unanswered.
"""

from __future__ import annotations

from mmsb_dist import limits

__all__ = ["AppliedSeqs"]


class AppliedSeqs:
    """Per client: (highest seq applied, bitmap) where bit k says whether seq ``highest - k`` was
    applied. Not thread-safe (the engine's lock guards it)."""

    def __init__(self, window: int = limits.dedup_window_seqs):
        self.window = int(window)
        self._full = (1 << self.window) - 1
        self._by_client: dict[int, tuple[int, int]] = {}

    def applied(self, client: int, seq: int) -> bool:
        top, bits = self._by_client.get(client, (0, 0))
        if seq > top:
            return False
        k = top - seq
        return k >= self.window or bool(bits >> k & 1)

    def add(self, client: int, seq: int) -> None:
        top, bits = self._by_client.get(client, (0, 0))
        if seq > top:
            self._by_client[client] = (seq, ((bits << (seq - top)) | 1) & self._full)
        elif top - seq < self.window:
            self._by_client[client] = (top, bits | 1 << (top - seq))

    def highest(self, client: int) -> int:
        return self._by_client.get(client, (0, 0))[0]

    def __len__(self) -> int:
        return len(self._by_client)

    def copy(self) -> "AppliedSeqs":
        out = AppliedSeqs(self.window)
        out._by_client = dict(self._by_client)  # values are immutable tuples
        return out

    def to_json(self) -> dict:
        """{client id as a string: [highest seq, bitmap as a hex string]} (checkpoint manifests)."""
        return {str(c): [top, format(bits, "x")] for c, (top, bits) in self._by_client.items()}

    @classmethod
    def from_json(cls, applied: dict | None = None, hwm: dict | None = None,
                  window: int = limits.dedup_window_seqs) -> "AppliedSeqs":
        """From ``to_json``'s form, or from a high-water-mark map {client: seq} (manifests written
        before the bitmap: every seq up to the mark counts as applied, as it did then)."""
        out = cls(window)
        for c, (top, bits) in (applied or {}).items():
            out._by_client[int(c)] = (int(top), int(bits, 16) & out._full)
        for c, top in (hwm or {}).items():
            out._by_client.setdefault(int(c), (int(top), out._full))
        return out
