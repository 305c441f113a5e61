"""Which batches a shard has applied, by delta id (client id, seq), so that a batch sent twice (a
call Ray re-sends to a restarted shard, a client's retry) applies at most once.

A client numbers its batches 1, 2, 3, ... across every shard. A shard cannot assume that it sees
one client's batches in that order: a client may have several in flight (the gateway answers
concurrent requests through one client; a shard runs writes on several threads), and Ray re-sends
the calls in flight to a restarted shard in no particular order. So a shard keeps, per client, the
highest seq it applied and a bitmap of which seqs below it it applied, back to the oldest one still
missing and at most ``window`` seqs. A batch more than ``window`` seqs below the highest one is
taken as applied (a duplicate): the client would have had to send ``window`` batches after it
while it was still unanswered.
"""

from __future__ import annotations

from mmsb_dist import limits

__all__ = ["AppliedSeqs", "is_delta_id"]


def is_delta_id(client: int, seq: int) -> bool:
    """Whether (client, seq) identifies a batch: client 0 or seq 0 (and below) is no delta id, and
    such a batch is never taken for a duplicate."""
    return client != 0 and seq >= 1


class AppliedSeqs:
    """Per client: (highest seq applied, bitmap, span) where bit k (k < span) says whether seq
    ``highest - k`` was applied, and every seq from 1 up to ``highest - span`` was (or lies beyond
    the window). After each change the span shrinks to end at the oldest seq not yet applied, so a
    client whose batches all arrived costs three integers, and one with a gap at most ``window``
    bits. Seq 0 (and below) is no delta id: never applied. Not thread-safe (the engine's lock
    guards it)."""

    def __init__(self, window: int = limits.dedup_window_seqs):
        self.window = int(window)
        self._by_client: dict[int, tuple[int, int, int]] = {}

    def applied(self, client: int, seq: int) -> bool:
        top, bits, span = self._by_client.get(client, (0, 0, 0))
        if not is_delta_id(client, seq) or seq > top:
            return False
        k = top - seq
        return k >= span or bool(bits >> k & 1)

    def add(self, client: int, seq: int) -> None:
        if not is_delta_id(client, seq):
            return
        top, bits, span = self._by_client.get(client, (0, 0, 0))
        if seq > top:
            top, bits, span = seq, (bits << (seq - top)) | 1, span + seq - top
        elif top - seq < span:
            bits |= 1 << (top - seq)
        else:
            return  # applied already
        self._by_client[client] = self._trimmed(top, bits, span)

    def _trimmed(self, top: int, bits: int, span: int) -> tuple[int, int, int]:
        """The same set with the span ending at the oldest seq not applied (none: span 0)."""
        span = min(span, self.window, top)       # seqs below 1, or past the window, count as applied
        missing = ~bits & ((1 << span) - 1)
        span = missing.bit_length()
        return top, bits & ((1 << span) - 1), span

    def highest(self, client: int) -> int:
        return self._by_client.get(client, (0, 0, 0))[0]

    def __len__(self) -> int:
        return len(self._by_client)

    def copy(self) -> "AppliedSeqs":
        out = AppliedSeqs(self.window)
        out._by_client = dict(self._by_client)  # values are immutable tuples
        return out

    def to_json(self) -> dict:
        """{client id as a string: [highest seq, bitmap as a hex string, span]} (checkpoint
        manifests)."""
        return {str(c): [top, format(bits, "x"), span]
                for c, (top, bits, span) in self._by_client.items()}

    @classmethod
    def from_json(cls, applied: dict | None = None, hwm: dict | None = None,
                  window: int = limits.dedup_window_seqs) -> "AppliedSeqs":
        """From ``to_json``'s form; from the fourth session's [highest, bitmap] (the bitmap spans
        the whole window); or from a high-water-mark map {client: seq} (manifests written before
        the bitmap: every seq up to the mark counts as applied, as it did then)."""
        out = cls(window)
        for c, entry in (applied or {}).items():
            top, bits = int(entry[0]), int(entry[1], 16)
            span = int(entry[2]) if len(entry) > 2 else window
            out._by_client[int(c)] = out._trimmed(top, bits, span)
        for c, top in (hwm or {}).items():
            out._by_client.setdefault(int(c), out._trimmed(int(top), 0, 0))
        return out
