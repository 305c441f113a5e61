"""Run as a driver: checks a job's RESULT through `connect()` against the example's own reference
computation. argv: example name (grid or embedding), namespace, RESULT JSON. Prints OK or exits 1."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def main() -> None:
    kind, namespace, result = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    import mmsb_dist as mm

    bus = mm.connect(namespace=namespace)
    ids = np.array(result["pages"], np.uint64)
    last = result["epochs"][-1]
    assert last in bus.committed_epochs(), (last, bus.committed_epochs())
    if kind == "grid":
        import grid

        got = np.concatenate([a.reshape(result["band_rows"], result["cols"])
                              for a in bus.read_many(ids, epoch=last)])
        want = grid.simulate(result["rows"], result["cols"], result["steps"])
        first = np.concatenate([a.reshape(result["band_rows"], result["cols"])
                                for a in bus.read_many(ids, epoch=result["epochs"][0])])
        assert np.array_equal(first, grid.initial_grid(result["rows"], result["cols"]))
    else:
        import embedding

        got = np.concatenate([a.reshape(-1, result["dim"]) for a in bus.read_many(ids, epoch=last)])
        want = embedding.train_reference(result["rows"], result["dim"], result["workers"],
                                         result["rounds"], result["steps"], result["seed"])
    assert np.array_equal(got, want), f"{kind}: {np.abs(got - want).max()} max difference"
    bus.replay(last)   # the job's last epoch rebuilds to its recorded hashes on every shard
    print("OK", kind, len(ids), "pages at epoch", last)


if __name__ == "__main__":
    main()
