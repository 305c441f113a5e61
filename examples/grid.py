"""A simulation grid on mmsb-dist: heat diffusion over a 2-D float32 grid, one page per band of
rows, one committed epoch per time step (so every step can be read back or replayed later).

Run against a runtime started with `mmsb-dist start`, directly or as a Ray job:

    python examples/grid.py --steps 20
    ray job submit --address http://127.0.0.1:8265 --working-dir examples -- python grid.py

It prints one line `RESULT {...}` (JSON: page ids, epochs, checksum) for whoever checks the run.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def initial_grid(rows: int, cols: int) -> np.ndarray:
    grid = np.zeros((rows, cols), np.float32)
    grid[0, :] = 100.0                       # a hot edge; the others stay at 0
    return grid


def step(grid: np.ndarray) -> np.ndarray:
    """One Jacobi step of the heat equation; the boundary stays fixed."""
    out = grid.copy()
    out[1:-1, 1:-1] = 0.25 * (grid[:-2, 1:-1] + grid[2:, 1:-1] + grid[1:-1, :-2] + grid[1:-1, 2:])
    return out


def simulate(rows: int, cols: int, steps: int) -> np.ndarray:
    grid = initial_grid(rows, cols)
    for _ in range(steps):
        grid = step(grid)
    return grid


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--namespace", default="mmsb")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=256)
    ap.add_argument("--band-rows", type=int, default=32, help="grid rows per page")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.rows % args.band_rows:
        ap.error("--rows must be a multiple of --band-rows")

    import mmsb_dist as mm

    bus = mm.connect(namespace=args.namespace)
    bands = args.rows // args.band_rows
    band_bytes = args.band_rows * args.cols * 4
    ids = bus.create_pages(bands, band_bytes, dtype="float32")

    def store(grid: np.ndarray) -> int:
        payload = grid.reshape(bands, band_bytes // 4).view(np.uint8)
        bus.write_many(ids, np.zeros(bands, np.int64), payload)   # durable on return
        return bus.commit()

    def load(epoch=None) -> np.ndarray:
        return np.concatenate([a.reshape(args.band_rows, args.cols)
                               for a in bus.read_many(ids, epoch=epoch)])

    epochs = [store(initial_grid(args.rows, args.cols))]
    for _ in range(args.steps):
        epochs.append(store(step(load())))   # every step reads the shared state back
    final = load()
    result = {"pages": [int(i) for i in ids], "epochs": epochs, "rows": args.rows,
              "cols": args.cols, "steps": args.steps, "band_rows": args.band_rows,
              "checksum": float(final.astype(np.float64).sum())}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
