"""Child process of the engine crash test: apply seeded batches until killed, acknowledging each.

    python tests/_enginechild.py DATA_DIR SEED ROUND

Opens a ShardEngine (recovery), prints ``ready``, creates whichever of the test's pages are missing,
then loops: apply batch k (printing ``ack <seq> <first_lsn>`` after apply() returned), seal an
epoch every 7 batches and checkpoint every third seal. Batch ``seq`` = ROUND * 10**6 + k is rebuilt
by ``batch_for(seed, seq)``, so the parent can check any recovered state without knowing what the
child managed to do. Each batch carries (client 1, seq) as its delta id. Odd rounds apply every
batch to the arena while the log writes it (ShardEngine's overlapped path), even rounds after.
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
    """Mixed runs and masked deltas over the test pages, overlapping; sometimes large. Built as
    columns (no Python per delta), so a child spends its time in the engine."""
    rng = np.random.default_rng([seed, seq])
    n = int(rng.integers(1, 400)) if rng.random() < 0.9 else int(rng.integers(2000, 6000))
    sizes = np.asarray(PAGE_SIZES)
    pids = rng.integers(0, PAGES, n)
    offsets = rng.integers(0, sizes[pids])
    lengths = rng.integers(1, np.minimum(sizes[pids] - offsets, 200) + 1)
    masked = rng.random(n) < 0.25
    data_starts = np.concatenate([[0], np.cumsum(lengths)])
    mask_lengths = np.where(masked, (lengths + 7) // 8, 0)
    mask_starts = np.concatenate([[0], np.cumsum(mask_lengths)])
    payload = rng.integers(0, 256, int(data_starts[-1]), dtype=np.uint8)
    masks = rng.integers(0, 256, int(mask_starts[-1]), dtype=np.uint8)
    return DeltaBatch(pids.astype(np.uint64), offsets.astype(np.int64), data_starts, payload,
                      masked, mask_starts, masks, client_id=1, seq=seq)


def main() -> None:
    import time

    from mmsb_dist.engine import ShardEngine

    data_dir, seed, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if rnd % 2:  # odd rounds apply every batch while the log writes it (the large-batch path)
        from mmsb_dist import limits
        limits.log_overlap_bytes_min = 0
    engine = ShardEngine(data_dir, backend="numpy", fsync="always")
    print("ready", flush=True)
    existing = set(engine.arena.page_ids().tolist())  # a kill may land between two creates
    for pid, size in enumerate(PAGE_SIZES):
        if pid not in existing:
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
