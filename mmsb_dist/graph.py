"""The dependency graph: derived pages, their recompute functions, and the barrier's recompute plan.

A derived page ``child`` is declared with ``depend(child, parents, fn)``: its bytes are always
``fn(parents)``, recomputed when a parent changes, and written by nothing else. This module is pure
(no Ray, no I/O): the shard engine evaluates functions and logs the results, the coordinator (or an
in-process driver) owns the global :class:`DependencyGraph` and carries out its :class:`Plan`.

Recompute functions (:class:`Recompute`) are either built in, named by a string or a tuple, or a
user callable:

* ``"copy"``: one parent, same size as the child;
* ``("slice", start, stop)``: bytes ``[start, stop)`` of one parent (child size ``stop - start``);
* ``"concat"``: the parents' bytes one after another (child size = the sum of theirs);
* ``"sum"``, ``"max"``, ``"min"``, ``"xor"``: elementwise over the child's dtype view, across
  parents of the child's size (``xor`` on integer dtypes only; ``sum`` wraps like the dtype does);
* a callable ``fn(*parents) -> array``: receives each parent as a typed view (NumPy on a CPU shard,
  CuPy on a GPU shard; read-only: return a new array) and returns an array of the child's size in
  bytes. It is shipped to the shard that owns the child (cloudpickle, from the trusted driver only:
  the HTTP gateway accepts built-ins only) and kept in that shard's log and checkpoints, unpickled
  only when it must run: replay never runs it (recompute results are logged as deltas).

At the epoch barrier every derived page with a changed parent is recomputed once, in topological
order, from its parents' state at the cut (:meth:`DependencyGraph.plan`): a diamond ``a -> b, c ->
d`` recomputes ``d`` after both ``b`` and ``c``, never from a stale one (the original MMSB
propagated depth first and did).
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field

import msgpack
import numpy as np

from mmsb_dist.errors import GraphCycleError, InvalidDeltaError, InvalidPageError, MmsbError

__all__ = ["Recompute", "DependencyGraph", "Plan", "BUILTINS", "make_fn", "evaluate",
           "check_shapes"]

BUILTINS = ("copy", "slice", "concat", "sum", "max", "min", "xor")
_REDUCERS = ("sum", "max", "min", "xor")


@dataclass(frozen=True)
class Recompute:
    """A recompute function in its shipped form: ``kind`` is a built-in name or ``"user"``."""

    kind: str
    args: tuple = ()
    blob: bytes = b""  # user functions: cloudpickle bytes

    def encode(self) -> bytes:
        return msgpack.packb([self.kind, list(self.args), self.blob], use_bin_type=True)

    @staticmethod
    def decode(data: bytes) -> "Recompute":
        return _decode(bytes(data))

    def describe(self) -> str:
        if self.kind == "user":
            return "user function"
        return self.kind + (f"{tuple(self.args)}" if self.args else "")


@functools.lru_cache(maxsize=4096)
def _decode(data: bytes) -> Recompute:
    """Decoded once per distinct record (a recompute decodes its function every time)."""
    try:
        kind, args, blob = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise InvalidDeltaError(f"malformed recompute function record: {exc}") from exc
    return _checked(Recompute(str(kind), tuple(args), bytes(blob)))


def _checked(r: Recompute) -> Recompute:
    if r.kind == "user":
        if not r.blob:
            raise InvalidDeltaError("a user recompute function needs its pickled bytes")
        return r
    if r.kind not in BUILTINS:
        raise InvalidDeltaError(f"unknown recompute function {r.kind!r}; built-ins: "
                                f"{', '.join(BUILTINS)}, or pass a callable")
    if r.kind == "slice":
        if (len(r.args) != 2 or not all(isinstance(a, int) for a in r.args)
                or not 0 <= r.args[0] < r.args[1]):
            raise InvalidDeltaError(f"('slice', start, stop) needs 0 <= start < stop, got "
                                    f"{r.args!r}")
    elif r.args:
        raise InvalidDeltaError(f"recompute function {r.kind!r} takes no arguments, got "
                                f"{r.args!r}")
    return r


def make_fn(fn) -> Recompute:
    """A :class:`Recompute` from what a user passes: a built-in name, ``("slice", a, b)``, a
    callable, or a Recompute."""
    if isinstance(fn, Recompute):
        return _checked(fn)
    if isinstance(fn, str):
        return _checked(Recompute(fn))
    if isinstance(fn, (tuple, list)) and fn and isinstance(fn[0], str):
        return _checked(Recompute(fn[0], tuple(int(a) for a in fn[1:])))
    if callable(fn):
        import cloudpickle

        return Recompute("user", (), cloudpickle.dumps(fn))
    raise InvalidDeltaError(f"a recompute function is a built-in name ({', '.join(BUILTINS)}), "
                            f"('slice', start, stop) or a callable, not {type(fn).__name__}")


@functools.lru_cache(maxsize=256)
def _unpickle(blob: bytes):
    import cloudpickle

    try:
        return cloudpickle.loads(blob)
    except Exception as exc:  # a module the function needs is missing here, or damaged bytes
        raise InvalidDeltaError(
            f"cannot load the user recompute function here: {exc!r} (define it in the driver "
            "script, or make its module importable on the cluster, e.g. through the job's "
            "working_dir, or cloudpickle.register_pickle_by_value(module))") from exc


def check_shapes(fn: Recompute, child: int, child_info: tuple[int, str],
                 parent_infos: list[tuple[int, tuple[int, str]]]) -> None:
    """Refuse a registration whose page sizes or dtypes cannot fit ``fn`` (InvalidPageError naming
    the page). ``*_info``: (size in bytes, dtype name)."""
    size, dtype = child_info
    if not parent_infos:
        raise InvalidPageError(f"derived page {child} needs at least one parent", page=child)
    if fn.kind in ("copy", "slice") and len(parent_infos) != 1:
        raise InvalidPageError(f"{fn.describe()} takes one parent, got {len(parent_infos)}",
                               page=child)
    if fn.kind == "copy" and parent_infos[0][1][0] != size:
        p, (psize, _) = parent_infos[0]
        raise InvalidPageError(f"copy of page {p} ({psize} bytes) into derived page {child} "
                               f"({size} bytes): sizes differ", page=child)
    if fn.kind == "slice":
        start, stop = fn.args
        p, (psize, _) = parent_infos[0]
        if stop > psize or stop - start != size:
            raise InvalidPageError(f"slice [{start}, {stop}) of page {p} ({psize} bytes) into "
                                   f"derived page {child} ({size} bytes) does not fit",
                                   page=child)
    if fn.kind == "concat":
        total = sum(info[0] for _, info in parent_infos)
        if total != size:
            raise InvalidPageError(f"concat of parents totalling {total} bytes into derived page "
                                   f"{child} of {size} bytes", page=child)
    if fn.kind in _REDUCERS:
        for p, (psize, _) in parent_infos:
            if psize != size:
                raise InvalidPageError(f"{fn.kind} over parent {p} ({psize} bytes) into derived "
                                       f"page {child} ({size} bytes): sizes differ", page=child)
        if size % np.dtype(dtype).itemsize:
            raise InvalidPageError(f"derived page {child}: {size} bytes is not a whole number of "
                                   f"{dtype}", page=child)
        if fn.kind == "xor" and np.dtype(dtype).kind not in "iu":
            raise InvalidPageError(f"xor needs an integer dtype, derived page {child} is {dtype}",
                                   page=child)


_OPS = {"sum": lambda xp: xp.add, "max": lambda xp: xp.maximum,
        "min": lambda xp: xp.minimum, "xor": lambda xp: xp.bitwise_xor}


@functools.lru_cache(maxsize=64)
def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def evaluate(fn: Recompute, parents: list, child: int, size: int, dtype: str, xp):
    """``fn(parents)`` as a flat uint8 array of ``size`` bytes on ``xp`` (numpy or cupy).
    ``parents``: flat uint8 arrays on ``xp``, never written. The result may share memory with a
    parent (``copy`` and ``slice`` return the parent's bytes themselves: no copy, no kernel), so
    callers must not write to it either; they copy results once, all together."""
    kind = fn.kind
    if kind == "copy":
        return parents[0]
    if kind == "slice":
        return parents[0][fn.args[0]:fn.args[1]]
    if kind == "concat":
        return xp.concatenate(parents)
    if kind in _REDUCERS:
        views = [p.view(dtype) for p in parents]
        if len(views) == 1:
            return parents[0]
        op = _OPS[kind](xp)
        out = op(views[0], views[1])
        for v in views[2:]:
            op(out, v, out=out)
        return out.view(xp.uint8)
    user = _unpickle(fn.blob)
    itemsize = _itemsize(dtype)
    views = []
    for p in parents:
        v = p.view(dtype) if p.size % itemsize == 0 else p[:]  # a new view: flags are its own
        if type(v) is np.ndarray:
            v.flags.writeable = False
        views.append(v)
    try:
        result = user(*views)
    except MmsbError:
        raise
    except Exception as exc:
        raise InvalidDeltaError(f"the recompute function of derived page {child} raised "
                                f"{exc!r}", page=child) from exc
    try:
        if not (type(result) is xp.ndarray and result.dtype == dtype
                and result.flags.c_contiguous):
            result = xp.ascontiguousarray(xp.asarray(result, dtype=dtype))
        result = result.reshape(-1).view(xp.uint8)
    except (TypeError, ValueError) as exc:
        raise InvalidDeltaError(f"the recompute function of derived page {child} returned "
                                f"something that is not a {dtype} array: {exc}",
                                page=child) from exc
    if result.size != size:
        raise InvalidDeltaError(f"the recompute function of derived page {child} returned "
                                f"{result.size} bytes, the page holds {size}", page=child,
                                length=int(result.size))
    return result


# ---- the global graph ----------------------------------------------------------------------------

@dataclass
class Plan:
    """What one barrier recomputes. ``rounds[r]``: shard -> children to recompute, in order, in
    round ``r``. A child is in a later round than every parent it needs from another shard, so a
    round needs only values that earlier rounds (or the cut) settled; on one shard a round's
    children run in the order given, which is topological."""

    rounds: list[dict[int, list[int]]] = field(default_factory=list)
    order: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.order)


class DependencyGraph:
    """child -> parents (ordered: the function sees them in this order) and the reverse edges."""

    def __init__(self):
        self.parents: dict[int, tuple[int, ...]] = {}
        self.children: dict[int, set[int]] = {}

    def __len__(self) -> int:
        return len(self.parents)

    def is_derived(self, page: int) -> bool:
        return int(page) in self.parents

    def check_add(self, child: int, parents) -> tuple[int, ...]:
        """The parents as a tuple, or GraphCycleError / InvalidPageError; changes nothing."""
        child = int(child)
        parents = tuple(int(p) for p in parents)
        if not parents:
            raise InvalidPageError(f"derived page {child} needs at least one parent", page=child)
        if child in self.parents:
            raise InvalidPageError(f"page {child} is already derived (undepend it first)",
                                   page=child)
        if child in parents:
            raise GraphCycleError(f"page {child} cannot depend on itself", page=child)
        # A cycle closes iff some parent is reachable from the child along child edges.
        targets = set(parents)
        came_from = {child: None}
        queue = deque([child])
        while queue:
            node = queue.popleft()
            for c in sorted(self.children.get(node, ())):
                if c in came_from:
                    continue
                came_from[c] = node
                if c in targets:
                    path = [c]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])
                    cycle = " -> ".join(str(p) for p in reversed(path)) + f" -> {child}"
                    raise GraphCycleError(f"depend({child}, ...) would close the cycle {cycle}; "
                                          "nothing was registered", page=child)
                queue.append(c)
        return parents

    def add(self, child: int, parents) -> None:
        self._link(int(child), self.check_add(child, parents))

    @classmethod
    def from_edges(cls, edges) -> "DependencyGraph":
        """A graph of edges that were checked when they were registered: (child, parents)."""
        graph = cls()
        for child, parents in edges:
            graph._link(int(child), tuple(int(p) for p in parents))
        return graph

    def _link(self, child: int, parents: tuple[int, ...]) -> None:
        self.parents[child] = parents
        for p in parents:
            self.children.setdefault(p, set()).add(child)

    def remove(self, child: int) -> tuple[int, ...]:
        child = int(child)
        parents = self.parents.pop(child, None)
        if parents is None:
            raise InvalidPageError(f"page {child} is not derived", page=child)
        for p in parents:
            kids = self.children.get(p)
            if kids is not None:
                kids.discard(child)
                if not kids:
                    del self.children[p]
        return parents

    def edges(self) -> list[tuple[int, tuple[int, ...]]]:
        return sorted(self.parents.items())

    def affected(self, changed) -> list[int]:
        """Every derived page downstream of ``changed`` pages (derived ones in ``changed``
        included), in topological order (ties by id, so the order is deterministic)."""
        seen: set[int] = set()
        queue = deque(int(p) for p in changed)
        for p in list(queue):
            if p in self.parents:
                seen.add(p)
        while queue:
            node = queue.popleft()
            for c in self.children.get(node, ()):
                if c not in seen:
                    seen.add(c)
                    queue.append(c)
        # Kahn's algorithm on the affected subgraph.
        indeg = {c: len({p for p in self.parents[c] if p in seen}) for c in seen}
        import heapq

        ready = [c for c, d in indeg.items() if d == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            node = heapq.heappop(ready)
            order.append(node)
            for c in self.children.get(node, ()):
                if c in indeg:
                    indeg[c] -= 1
                    if indeg[c] == 0:
                        heapq.heappush(ready, c)
        return order

    def plan(self, changed, owner) -> Plan:
        """The barrier's recompute plan for ``changed`` pages; ``owner(page) -> shard``."""
        order = self.affected(changed)
        in_plan = set(order)
        rnd: dict[int, int] = {}
        rounds: list[dict[int, list[int]]] = []
        for c in order:
            oc = owner(c)
            r = 0
            for p in self.parents[c]:
                if p in in_plan:
                    r = max(r, rnd[p] + (owner(p) != oc))
            rnd[c] = r
            while len(rounds) <= r:
                rounds.append({})
            rounds[r].setdefault(oc, []).append(c)
        return Plan(rounds, order)

    def remote_parents(self, children, shard: int, owner) -> dict[int, list[int]]:
        """Parents of ``children`` owned by other shards, grouped by owner."""
        out: dict[int, set[int]] = {}
        for c in children:
            for p in self.parents[c]:
                o = owner(p)
                if o != shard:
                    out.setdefault(o, set()).add(p)
        return {o: sorted(ps) for o, ps in out.items()}

    def watch_tables(self, owner) -> dict[int, dict[int, list[int]]]:
        """shard -> {parent page on that shard: [other shards with children of it]}: where each
        shard sends a changed parent's bytes for eager cross-shard propagation."""
        out: dict[int, dict[int, set[int]]] = {}
        for c, ps in self.parents.items():
            oc = owner(c)
            for p in ps:
                op = owner(p)
                if op != oc:
                    out.setdefault(op, {}).setdefault(p, set()).add(oc)
        return {s: {p: sorted(t) for p, t in table.items()} for s, table in out.items()}


def changed_pages(graph: DependencyGraph, reports: dict, owner, pending=()) -> set[int]:
    """What the barrier treats as changed: the pages each shard reported (``reports``: shard ->
    (page ids, unknown)), every parent on a shard whose changes are unknown (it restarted), and
    ``pending`` (newly derived pages)."""
    changed = {int(p) for p in pending}
    unknown = {s for s, (_, all_) in reports.items() if all_}
    for s, (ids, _) in reports.items():
        changed.update(int(p) for p in ids)
    if unknown:
        changed.update(p for p in graph.children if owner(p) in unknown)
        changed.update(c for c in graph.parents if owner(c) in unknown)
    return changed


def run_plan(graph: DependencyGraph, plan: Plan, owner, fetch, recompute) -> list:
    """Carry out ``plan`` round by round. ``fetch({shard: [pages]}) -> {page: bytes}`` reads
    parents at the cut from their owners; ``recompute({shard: (children, {page: bytes})})``
    -> {shard: result} runs each shard's part of a round (the caller may run them in
    parallel). Returns the recompute errors [(child, message)]."""
    errors: list = []
    for rnd in plan.rounds:
        wanted: dict[int, set[int]] = {}
        remote_of: dict[int, dict[int, list[int]]] = {}
        for s, children in rnd.items():
            remote_of[s] = graph.remote_parents(children, s, owner)
            for o, ps in remote_of[s].items():
                wanted.setdefault(o, set()).update(ps)
        values = fetch({o: sorted(ps) for o, ps in wanted.items()}) if wanted else {}
        tasks = {s: (children, {p: values[p] for ps in remote_of[s].values() for p in ps})
                 for s, children in rnd.items()}
        for result in recompute(tasks).values():
            errors.extend(result["errors"])
    return errors
