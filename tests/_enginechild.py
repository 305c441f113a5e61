"""Child process of the engine crash test: apply seeded batches until killed, acknowledging each.

    python tests/_enginechild.py DATA_DIR SEED ROUND

Opens a ShardEngine (recovery), prints ``ready``, creates the test's pages if the shard has none,
then loops: apply batch k (printing ``ack <seq> <first_lsn>`` after apply() returned), seal an
epoch every 7 batches and checkpoint every third seal. Batch ``seq`` = ROUND * 10**6 + k is rebuilt
by ``batch_for(seed, seq)``, so the parent can check any recovered state without knowing what the
child managed to do. Each batch carries (client 1, seq) as its delta id.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmsb_dist.delta import DeltaBatch  # noqa: E402

PAGES = 24
PAGE_SIZES = [int(s) for s in np.random.default_rng(7).integers(1, 3000, PAGES)]
RUN_SECONDS_MAX = 30.0


def batch_for(seed: int, seq: int) -> DeltaBatch:
    """Mixed runs and masked deltas over the test pages, overlapping; sometimes large."""
    rng = np.random.default_rng([seed, seq])
    n = int(rng.integers(1, 400)) if rng.random() < 0.9 else int(rng.integers(2000, 20000))
    parts = []
    pids = rng.integers(0, PAGES, n)
    for pid in pids:
        size = PAGE_SIZES[pid]
        off = int(rng.integers(size))
        length = int(rng.integers(1, min(size - off, 200) + 1))
        data = rng.integers(0, 256, length, dtype=np.uint8)
        if rng.random() < 0.25:
            mask = np.packbits(rng.random(length) < 0.5, bitorder="little")
            parts.append(DeltaBatch.masked_deltas([pid], [off], [mask], [data]))
        else:
            parts.append(DeltaBatch.runs([pid], [off], [data]))
    return DeltaBatch.concat(parts, client_id=1, seq=seq)


def main() -> None:
    import time

    from mmsb_dist.engine import ShardEngine

    data_dir, seed, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    engine = ShardEngine(data_dir, backend="numpy", fsync="always")
    print("ready", flush=True)
    if engine.arena.page_count == 0:
        for pid, size in enumerate(PAGE_SIZES):
            engine.create_pages(ids=[pid], size=size)
        print("created", flush=True)
    start = time.monotonic()
    k = 0
    while time.monotonic() - start < RUN_SECONDS_MAX:
        seq = rnd * 10**6 + k
        ack = engine.apply(batch_for(seed, seq))
        print("ack", seq, ack.first_lsn, flush=True)
        k += 1
        if k % 7 == 0:
            seal = engine.seal()
            print("seal", seal.epoch, flush=True)
            if seal.epoch % 3 == 0:
                engine.checkpoint()
                print("checkpoint", seal.epoch, flush=True)
    engine.close()


if __name__ == "__main__":
    main()
