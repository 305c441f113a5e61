"""Which shard owns a page: a jump consistent hash of the page id.

Jump consistent hash (Lamping & Veach, 2014) maps a key to one of ``n`` buckets so that going from
``n`` to ``n + 1`` buckets moves only ~1/(n+1) of the keys, all of them to the new bucket: the
shard count can change at restore while most pages stay where they are. Page ids are mixed with
fmix64 first, so sequential ids spread evenly.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmsb_dist import _cpu

__all__ = ["shard_of", "shards_of"]

_LCG = np.uint64(2862933555777941757)


@njit(nogil=True, cache=True)
def _jump(keys, buckets, out):
    for i in range(keys.shape[0]):
        key = _cpu._fmix64(keys[i])
        b, j = -1, 0
        while j < buckets:
            b = j
            key = key * _LCG + np.uint64(1)
            j = int((b + 1) * (2147483648.0 / float((key >> np.uint64(33)) + np.uint64(1))))
        out[i] = b


def shards_of(page_ids, shards: int) -> np.ndarray:
    """The owning shard (0 .. shards-1) of each page id."""
    if shards < 1:
        raise ValueError(f"shards={shards}: need at least one shard")
    ids = np.ascontiguousarray(page_ids, dtype=np.uint64).reshape(-1)
    if shards == 1:  # the jump hash of any key into one bucket is 0
        return np.zeros(ids.size, np.int64)
    out = np.empty(ids.size, np.int64)
    _jump(ids, int(shards), out)
    return out


def shard_of(page_id: int, shards: int) -> int:
    return int(shards_of([page_id], shards)[0])
