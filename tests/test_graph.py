"""The dependency graph without Ray: registration (cycles, shapes), glitch-free propagation at the
barrier against a sequential oracle (random DAGs, chains, diamonds, fan-in 16, fan-out 1000),
eager propagation, refused writes to derived pages, and replay with the functions gone."""

import importlib
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphkit import LocalCluster, Oracle
from mmsb_dist.delta import DeltaBatch
from mmsb_dist.engine import ShardEngine
from mmsb_dist.errors import (DerivedPageError, GraphCycleError, InvalidDeltaError,
                              InvalidPageError)
from mmsb_dist.graph import DependencyGraph, make_fn
from mmsb_dist.placement import shards_of

SIZE = 64  # bytes per page in the random workloads: 16 uint32 lanes


def _assert_matches(cluster, oracle, pages):
    for p in pages:
        assert np.array_equal(cluster.read(p), oracle.pages[p]), p


def _bytes(rng, n):
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


# ---- registration --------------------------------------------------------------------------------

def test_cycles_are_refused_and_nothing_is_registered():
    g = DependencyGraph()
    g.add(2, [1])
    g.add(3, [2])
    g.add(4, [3, 1])
    before = g.edges()
    with pytest.raises(GraphCycleError, match=r"cycle 1 -> 4 -> 1\b"):  # the shortest one
        g.add(1, [4])
    with pytest.raises(GraphCycleError, match=r"cycle 1 -> 2 -> 3 -> 1\b"):
        g.add(1, [3])
    with pytest.raises(GraphCycleError, match="itself"):
        g.add(5, [5])
    assert g.edges() == before


def test_already_derived_is_refused():
    g = DependencyGraph()
    g.add(2, [1])
    with pytest.raises(InvalidPageError, match="already derived"):
        g.add(2, [3])


def test_plan_orders_rounds_by_cross_shard_edges():
    g = DependencyGraph()
    g.add(2, [1])
    g.add(3, [2])
    g.add(4, [3])
    owner = {1: 0, 2: 0, 3: 1, 4: 1}.__getitem__
    plan = g.plan({1}, owner)
    assert plan.order == [2, 3, 4]
    assert plan.rounds == [{0: [2]}, {1: [3, 4]}]  # one hop across shards: two rounds


def test_bad_shapes_and_functions_are_refused(tmp_path):
    c = LocalCluster(tmp_path, shards=2)
    try:
        a = c.create(2, 64, "uint32")
        b = c.create(1, 32)
        graph_before = c.graph.edges()
        with pytest.raises(InvalidPageError, match="sizes differ"):
            c.depend(int(b[0]), [int(a[0])], "copy")
        with pytest.raises(InvalidPageError, match="does not fit"):
            c.depend(int(b[0]), [int(a[0])], ("slice", 40, 80))
        with pytest.raises(InvalidPageError, match="concat"):
            c.depend(int(b[0]), [int(a[0]), int(a[1])], "concat")
        with pytest.raises(InvalidDeltaError, match="unknown recompute function"):
            make_fn("median")
        with pytest.raises(InvalidPageError, match="integer dtype"):
            f = c.create(2, 64, "float32")
            c.depend(int(f[0]), [int(f[1])], "xor")
        assert c.graph.edges() == graph_before
        assert all(not e.derivations() for e in c.engines)
    finally:
        c.close()


# ---- the diamond -----------------------------------------------------------------------------------

def _depth_first(children, fns, values, start):
    """The original MMSB's propagation: depth first from the written page, each page visited once."""
    visited = set()

    def visit(node):
        for c in sorted(children.get(node, ())):
            if c in visited:
                continue
            visited.add(c)
            parents, fn = fns[c]
            values[c] = fn(*[values[p] for p in parents])
            visit(c)

    visit(start)


def test_diamond_is_glitch_free_where_depth_first_is_not(tmp_path, backend):
    # a -> b (copy), a -> c (copy), d = b + c. Write a = 1: d must be 2.
    children = {"a": ["b", "c"], "b": ["d"], "c": ["d"]}
    fns = {"b": (["a"], lambda a: a), "c": (["a"], lambda a: a), "d": (["b", "c"], np.add)}
    values = {k: np.zeros(4, np.uint32) for k in "abcd"}
    values["a"] = np.ones(4, np.uint32)
    _depth_first(children, fns, values, "a")
    assert values["d"][0] == 1  # depth first recomputed d from a stale c: the glitch

    for shards in (1, 3):
        c = LocalCluster(tmp_path / f"s{shards}", shards=shards, backend=backend)
        try:
            a, b, cc, d = (int(p) for p in c.create(4, 16, "uint32"))
            c.depend(b, [a], "copy")
            c.depend(cc, [a], "copy")
            c.depend(d, [b, cc], "sum")
            c.commit()
            c.write(a, 0, np.ones(4, np.uint32).tobytes())
            c.commit()
            assert c.read(d).view(np.uint32).tolist() == [2, 2, 2, 2]
            assert c.last_plan.order.count(d) == 1  # coalesced: one recompute of d
        finally:
            c.close()


# ---- random DAGs against the oracle ---------------------------------------------------------------

def _user_mix(a, b=None):
    return a * np.uint32(3) + (np.uint32(7) if b is None else b)


FNS = ["copy", "sum", "max", "min", "xor", ("slice", 0, SIZE), _user_mix]


@st.composite
def workloads(draw):
    bases = draw(st.integers(1, 6))
    derived = draw(st.integers(1, 14))
    edges = []
    for i in range(derived):
        avail = bases + i
        fn = draw(st.sampled_from(FNS))
        if fn in ("copy",) or isinstance(fn, tuple):
            k = 1
        elif fn is _user_mix:
            k = draw(st.integers(1, 2))
        else:
            k = draw(st.integers(1, min(16, avail)))
        parents = draw(st.lists(st.integers(0, avail - 1), min_size=k, max_size=k))
        edges.append((parents, fn))
    ops = draw(st.lists(st.one_of(
        st.tuples(st.just("w"), st.integers(0, bases - 1), st.integers(0, SIZE - 1),
                  st.integers(1, SIZE), st.integers(0, 2**32 - 1)),
        st.just(("c",))), min_size=1, max_size=25))
    return bases, edges, ops, draw(st.integers(1, 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workloads())
def test_random_dags_match_the_oracle_after_every_commit(tmp_path_factory, w):
    bases, edges, ops, shards = w
    c = LocalCluster(tmp_path_factory.mktemp("dag"), shards=shards)
    o = Oracle()
    try:
        ids = [int(p) for p in c.create(bases + len(edges), SIZE, "uint32")]
        o.create(ids, SIZE, "uint32")
        for i, (parents, fn) in enumerate(edges):
            child, ps = ids[bases + i], [ids[p] for p in parents]
            c.depend(child, ps, fn)
            o.fns[child] = (ps, fn)
        for op in ops:
            if op[0] == "w":
                _, page, off, n, seed = op
                n = min(n, SIZE - off)
                data = _bytes(np.random.default_rng(seed), n)
                c.write(ids[page], off, data)
                o.write(ids[page], off, data)
            else:
                c.commit()
                o.commit(c.graph)
                assert not c.errors
                _assert_matches(c, o, ids)
                # After the first barrier every remote parent has been seen: eager propagation
                # alone keeps derived pages current between commits too.
        c.commit()
        o.commit(c.graph)
        _assert_matches(c, o, ids)
        for e in c.engines:
            e.validate_state()
    finally:
        c.close()


def test_eager_propagation_keeps_pages_current_between_commits(tmp_path, rng, backend):
    c = LocalCluster(tmp_path, shards=3, backend=backend)
    o = Oracle()
    try:
        ids = [int(p) for p in c.create(12, SIZE, "uint32")]
        o.create(ids, SIZE, "uint32")
        # a chain across shards, a diamond and a fan-in
        edges = [(ids[4], [ids[0]], "copy"), (ids[5], [ids[4]], _user_mix),
                 (ids[6], [ids[5], ids[1]], "sum"), (ids[7], [ids[0]], "copy"),
                 (ids[8], [ids[6], ids[7]], "xor"), (ids[9], ids[:4], "max")]
        for child, ps, fn in edges:
            c.depend(child, ps, fn)
            o.fns[child] = (ps, fn)
        c.commit()
        o.commit(c.graph)
        for _ in range(30):
            page, off = ids[int(rng.integers(0, 4))], int(rng.integers(0, SIZE - 8))
            data = _bytes(rng, 8)
            c.write(page, off, data)
            o.write(page, off, data)
            o.commit(c.graph)  # the oracle's derived pages, recomputed now
            _assert_matches(c, o, ids)
    finally:
        c.close()


def test_late_and_reordered_eager_messages_leave_no_stale_page(tmp_path, rng, backend):
    """On Ray, eager messages between shards arrive late and out of order, some after the
    barrier that made every page exact. A value older than one a shard has is dropped, so each
    commit stays exact whatever arrives after it, and once every message is in, pages are exact
    between commits too."""
    c = LocalCluster(tmp_path, shards=3, backend=backend)
    o = Oracle()
    try:
        ids = [int(p) for p in c.create(16, SIZE, "uint32")]
        o.create(ids, SIZE, "uint32")
        owners = [c.owner(p) for p in ids]
        assert len(set(owners)) == 3
        edges = [(ids[4], [ids[0]], "copy"), (ids[5], [ids[0]], _user_mix),
                 (ids[6], [ids[4], ids[5]], "sum"),  # a diamond
                 (ids[7], [ids[1], ids[2], ids[3], ids[6]], "max"),  # fan-in over it
                 (ids[8], [ids[7]], "copy"), (ids[9], [ids[8], ids[1]], "xor")]
        for child, ps, fn in edges:
            c.depend(child, ps, fn)
            o.fns[child] = (ps, fn)
        c.commit()
        o.commit(c.graph)
        c.in_flight = []
        crossing = 0
        for _ in range(12):
            for _ in range(int(rng.integers(1, 6))):
                page = ids[int(rng.integers(0, 4))]
                data = rng.integers(0, 1 << 30, SIZE // 4, dtype=np.uint32)
                c.write(page, 0, data.tobytes())
                o.write(page, 0, data.tobytes())
                c.deliver_some(rng, int(rng.integers(0, 4)))
            crossing += len(c.in_flight)
            c.commit()  # with messages still in flight: they arrive after the barrier
            o.commit(c.graph)
            _assert_matches(c, o, ids)
            c.deliver_some(rng)
            _assert_matches(c, o, ids)
        assert crossing > 0  # the test did send messages across commits
    finally:
        c.close()


def _copied_to_another_shard(c: LocalCluster) -> tuple[int, int]:
    """A parent page holding [1, 1] (uint32) and a child on another shard that copies it."""
    ids = [int(p) for p in c.create(12, 8, "uint32")]
    parent = ids[0]
    child = next(p for p in ids if c.owner(p) != c.owner(parent))
    c.depend(child, [parent], "copy")
    c.write(parent, 0, np.array([1, 1], np.uint32).tobytes())
    return parent, child


def test_a_message_from_before_a_restore_is_stale_after_it(tmp_path):
    """A restore sets page versions back; a value written before it and delivered after it must
    not win over the restored one (the shard's generation orders them)."""
    c = LocalCluster(tmp_path, shards=3)
    try:
        parent, child = _copied_to_another_shard(c)
        e1 = c.commit()
        c.in_flight = []
        c.write(parent, 0, np.array([2, 2], np.uint32).tobytes())  # its message stays in flight
        assert c.in_flight
        for e in c.engines:
            e.restore(e1)
        c.commit()
        assert c.read(child).view(np.uint32).tolist() == [1, 1]
        c.deliver_some(np.random.default_rng(0))
        assert c.read(parent).view(np.uint32).tolist() == [1, 1]
        assert c.read(child).view(np.uint32).tolist() == [1, 1]
    finally:
        c.close()


def test_a_message_from_before_a_crash_that_lost_the_log_tail_is_stale_after_it(tmp_path):
    """Under fsync="none" a crash may lose acknowledged writes, and the reopened log hands their
    LSNs out again: a value sent before the crash must not win over one written after it (the
    shard's incarnation orders them)."""
    c = LocalCluster(tmp_path, shards=3)
    try:
        parent, child = _copied_to_another_shard(c)
        c.commit()
        a = c.owner(parent)
        shard_dir = tmp_path / f"shard-{a}"
        c.engines[a].close()
        c.engines[a] = ShardEngine(shard_dir, shard=a, fsync="none")
        c._push_watch()
        log_dir = shard_dir / "log"
        at_open = {f.name: f.stat().st_size for f in log_dir.iterdir()}
        c.in_flight = []
        for v in (2, 3):  # their messages stay in flight
            c.write(parent, 0, np.array([v, v], np.uint32).tobytes())
        assert len(c.in_flight) == 2
        c.engines[a].close()
        for f in log_dir.iterdir():  # the crash: what was written since the open is lost
            if f.name in at_open:
                os.truncate(f, at_open[f.name])
            else:
                f.unlink()
        c.engines[a] = ShardEngine(shard_dir, shard=a, fsync="none")
        c._push_watch()
        assert c.read(parent).view(np.uint32).tolist() == [1, 1]
        c.write(parent, 0, np.array([4, 4], np.uint32).tobytes())  # the LSN [2, 2] had
        c.deliver_some(np.random.default_rng(0))
        assert c.read(child).view(np.uint32).tolist() == [4, 4]
        c.commit()
        assert c.read(child).view(np.uint32).tolist() == [4, 4]
    finally:
        c.close()


def test_long_chain_fan_in_16_and_fan_out_1000(tmp_path, rng, backend):
    c = LocalCluster(tmp_path, shards=3, backend=backend)
    o = Oracle()
    try:
        base = [int(p) for p in c.create(16, SIZE, "uint32")]
        chain = [int(p) for p in c.create(200, SIZE, "uint32")]
        fan_in = int(c.create(1, SIZE, "uint32")[0])
        fan_out = [int(p) for p in c.create(1000, SIZE, "uint32")]
        o.create(base + chain + [fan_in] + fan_out, SIZE, "uint32")
        prev = base[0]
        for p in chain:
            c.depend(p, [prev], _user_mix)
            o.fns[p] = ([prev], _user_mix)
            prev = p
        c.depend(fan_in, base, "sum")
        o.fns[fan_in] = (base, "sum")
        for p in fan_out:
            c.depend(p, [chain[-1]], "copy")
            o.fns[p] = ([chain[-1]], "copy")
        for _ in range(3):
            for p in base:
                data = _bytes(rng, SIZE)
                c.write(p, 0, data)
                o.write(p, 0, data)
            c.commit()
            o.commit(c.graph)
            assert not c.errors
            _assert_matches(c, o, o.pages)
    finally:
        c.close()


def test_concat_and_slice_shapes(tmp_path, rng, backend):
    c = LocalCluster(tmp_path, shards=2, backend=backend)
    try:
        a, b = (int(p) for p in c.create(2, 40))
        cat = int(c.create(1, 80)[0])
        part = int(c.create(1, 24)[0])
        c.depend(cat, [a, b], "concat")
        c.depend(part, [cat], ("slice", 30, 54))
        da, db = _bytes(rng, 40), _bytes(rng, 40)
        c.write(a, 0, da)
        c.write(b, 0, db)
        c.commit()
        assert c.read(cat).tobytes() == da + db
        assert c.read(part).tobytes() == (da + db)[30:54]
    finally:
        c.close()


def test_writes_to_derived_pages_are_refused_and_change_nothing(tmp_path):
    c = LocalCluster(tmp_path, shards=1)
    try:
        a, d = (int(p) for p in c.create(2, 16))
        c.depend(d, [a], "copy")
        e = c.engines[0]
        lsn = e.log.next_lsn
        with pytest.raises(DerivedPageError, match=f"page {d} is derived"):
            e.apply(DeltaBatch.runs([a, d], [0, 0], [b"x", b"y"]))
        assert e.log.next_lsn == lsn and not c.read(a).any()
        with pytest.raises(InvalidPageError, match="dependency graph"):
            e.free_pages([a])
        c.undepend(d)
        e.apply(DeltaBatch.runs([d], [0], [b"y"]))  # an ordinary page again
    finally:
        c.close()


def test_a_failing_user_function_leaves_its_page_and_reports(tmp_path, backend):
    c = LocalCluster(tmp_path, shards=1, backend=backend)
    try:
        a, d, ok = (int(p) for p in c.create(3, 16))

        def boom(x):
            raise RuntimeError("bad function")

        c.depend(d, [a], boom)
        c.depend(ok, [a], "copy")
        c.write(a, 0, b"\x05")
        c.commit()
        assert [ch for ch, _ in c.errors] == [d]
        assert "bad function" in c.errors[0][1]
        assert not c.read(d).any() and c.read(ok)[0] == 5
    finally:
        c.close()


# ---- replay without the functions ----------------------------------------------------------------

def test_replay_reproduces_derived_pages_with_the_functions_gone(tmp_path, rng):
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "userfns_tmp.py").write_text(
        "import numpy as np\n"
        "def blend(a, b):\n"
        "    return (a >> np.uint32(1)) + (b << np.uint32(2))\n")
    sys.path.insert(0, str(mod_dir))
    try:
        mod = importlib.import_module("userfns_tmp")
        c = LocalCluster(tmp_path / "cluster", shards=2)
        ids = [int(p) for p in c.create(6, SIZE, "uint32")]
        c.depend(ids[2], [ids[0], ids[1]], mod.blend)   # pickled by reference to the module
        c.depend(ids[3], [ids[2]], "copy")
        c.depend(ids[4], [ids[3], ids[0]], mod.blend)
        expect = {}
        for epoch in range(1, 6):
            for p in ids[:2]:
                c.write(p, int(rng.integers(0, SIZE - 16)), _bytes(rng, 16))
            e = c.commit()
            expect[e] = {p: c.read(p).copy() for p in ids}
            if epoch == 3:
                for eng in c.engines:
                    eng.checkpoint(e)
        hashes = {e: [s.state_hash for s in eng.seals()] for e, eng in enumerate(c.engines)}
        c.close()
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("userfns_tmp", None)
    (mod_dir / "userfns_tmp.py").unlink()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("userfns_tmp")
    from mmsb_dist import graph
    graph._unpickle.cache_clear()
    # Fresh engines (recovery), then replay to every epoch: no function runs, none is needed.
    engines = [ShardEngine(tmp_path / "cluster" / f"shard-{i}", shard=i, backend="numpy")
               for i in range(2)]
    try:
        for i, eng in enumerate(engines):
            assert [s.state_hash for s in eng.seals()] == hashes[i]
        for epoch, pages in expect.items():
            arenas = [eng.replay(epoch) for eng in engines]  # each checks the sealed hash
            for p, want in pages.items():
                arena = arenas[int(shards_of(np.array([p], np.uint64), 2)[0])]
                assert np.array_equal(arena.read(p).reshape(-1).view(np.uint8), want)
    finally:
        for eng in engines:
            eng.close()


def test_recompute_results_are_recompute_events_and_client_ids_stay_apart(tmp_path):
    from mmsb_dist.delta import RECOMPUTE_CLIENT_ID
    from mmsb_dist.formats import EventKind

    c = LocalCluster(tmp_path, shards=1)
    try:
        a, d = (int(p) for p in c.create(2, 16))
        c.depend(d, [a], "copy")
        c.write(a, 0, b"\x01\x02")
        e = c.engines[0]
        rows = e.events(0).batch.to_pydict()
        kinds = {(p, k) for p, k in zip(rows["page_id"], rows["kind"]) if p in (a, d)}
        assert (a, EventKind.WRITE) in kinds and (d, EventKind.RECOMPUTE) in kinds
        assert (d, EventKind.WRITE) not in kinds
        with pytest.raises(InvalidDeltaError, match="reserved"):
            e.apply(DeltaBatch.runs([a], [0], [b"x"], client_id=RECOMPUTE_CLIENT_ID, seq=1))
    finally:
        c.close()
