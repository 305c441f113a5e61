"""A shared embedding table on mmsb-dist, trained by parallel Ray tasks.

The table (rows x dim float32) is packed into pages of `--rows-per-page` rows. Each of `--workers`
Ray tasks owns a slice of the rows and applies `--steps` deterministic update steps to random rows
of its slice (as a trainer applying sparse gradients would), writing the changed rows straight into
the shared pages; the driver commits an epoch after every round and checkpoints at the end.

    python examples/embedding.py --workers 4
    ray job submit --address http://127.0.0.1:8265 --working-dir examples -- python embedding.py

Prints one line `RESULT {...}` (JSON: page ids, epochs, checksum) for whoever checks the run.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def initial_table(rows: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def worker_updates(table: np.ndarray, lo: int, hi: int, steps: int, seed: int, worker: int,
                   rnd: int, lr: float = 0.1):
    """The rows one worker changes in one round and their new values (deterministic)."""
    rng = np.random.default_rng([seed, worker, rnd])
    rows = np.unique(rng.integers(lo, hi, steps))
    grad = rng.standard_normal((rows.size, table.shape[1])).astype(np.float32)
    return rows, table[rows] - np.float32(lr) * grad


def train_reference(rows: int, dim: int, workers: int, rounds: int, steps: int, seed: int):
    """The table the distributed run must end with (for checks)."""
    table = initial_table(rows, dim, seed)
    for rnd in range(rounds):
        for w, (lo, hi) in enumerate(slices(rows, workers)):
            r, values = worker_updates(table, lo, hi, steps, seed, w, rnd)
            table[r] = values
    return table


def slices(rows: int, workers: int):
    bounds = np.linspace(0, rows, workers + 1).astype(int)
    return list(zip(bounds[:-1], bounds[1:]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--namespace", default="mmsb")
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rows-per-page", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=500, help="row updates per worker per round")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    if args.rows % args.rows_per_page:
        ap.error("--rows must be a multiple of --rows-per-page")

    import ray

    import mmsb_dist as mm

    bus = mm.connect(namespace=args.namespace)
    row_bytes = args.dim * 4
    npages = args.rows // args.rows_per_page
    ids = bus.create_pages(npages, args.rows_per_page * row_bytes, dtype="float32")
    table = initial_table(args.rows, args.dim, args.seed)
    bus.write_many(ids, np.zeros(npages, np.int64),
                   table.reshape(npages, -1).view(np.uint8))
    epochs = [bus.commit()]

    @ray.remote(num_cpus=0)
    def train_slice(ids, lo, hi, worker, rnd):
        """One worker's round: read its rows from the shared table, update, write them back."""
        import mmsb_dist as mm

        bus = mm.connect(namespace=args.namespace)
        pages = np.unique(np.arange(lo, hi) // args.rows_per_page)
        local = np.zeros((args.rows, args.dim), np.float32)
        for p, data in zip(pages, bus.read_many(ids[pages])):
            local[p * args.rows_per_page:(p + 1) * args.rows_per_page] = data.reshape(-1, args.dim)
        rows, values = worker_updates(local, lo, hi, args.steps, args.seed, worker, rnd)
        bus.write_many(ids[rows // args.rows_per_page], (rows % args.rows_per_page) * row_bytes,
                       values.view(np.uint8))
        return int(rows.size)

    updated = 0
    for rnd in range(args.rounds):
        updated += sum(ray.get([train_slice.remote(ids, lo, hi, w, rnd)
                                for w, (lo, hi) in enumerate(slices(args.rows, args.workers))]))
        epochs.append(bus.commit())
    bus.checkpoint()
    final = np.concatenate([a.reshape(-1, args.dim) for a in bus.read_many(ids)])
    result = {"pages": [int(i) for i in ids], "epochs": epochs, "rows_updated": updated,
              "rows": args.rows, "dim": args.dim, "workers": args.workers,
              "rounds": args.rounds, "steps": args.steps, "seed": args.seed,
              "checksum": float(final.astype(np.float64).sum())}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
