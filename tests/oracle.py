"""A plain per-byte model of pages: the oracle the engine's laws are checked against.

Deliberately independent of the kernels and the arena: bytearrays, one delta at a time, one byte at a
time for masks.
"""

from __future__ import annotations

import numpy as np


class PageOracle:
    def __init__(self):
        self.pages: dict[int, bytearray] = {}

    def create(self, page_id: int, size: int) -> None:
        self.pages[int(page_id)] = bytearray(size)

    def apply(self, batch) -> None:
        for i in range(len(batch)):
            page, offset, data, mask = batch.delta(i)
            buf = self.pages[page]
            if mask is None:
                buf[offset:offset + len(data)] = data
            else:
                for j in range(len(data)):
                    if (mask[j >> 3] >> (j & 7)) & 1:
                        buf[offset + j] = data[j]

    def bytes_of(self, page_id: int) -> bytes:
        return bytes(self.pages[int(page_id)])


def random_batch(rng: np.random.Generator, pages: dict[int, int], n: int, *,
                 masked_fraction: float = 0.3, max_len: int = 4096, aligned: bool = False):
    """A random batch over ``pages`` (id -> size) mixing runs and masked deltas, with overlaps."""
    from mmsb_dist.delta import DeltaBatch

    ids = np.array(list(pages), dtype=np.uint64)
    parts = []
    for _ in range(n):
        pid = int(ids[rng.integers(ids.size)])
        size = pages[pid]
        off = int(rng.integers(size))
        if aligned:
            off -= off % 16
        length = int(rng.integers(1, min(size - off, max_len) + 1))
        data = rng.integers(0, 256, length, dtype=np.uint8)
        if rng.random() < masked_fraction:
            mask = np.packbits(rng.random(length) < 0.5, bitorder="little")
            parts.append(DeltaBatch.masked_deltas([pid], [off], [mask], [data]))
        else:
            parts.append(DeltaBatch.runs([pid], [off], [data]))
    return DeltaBatch.concat(parts)
