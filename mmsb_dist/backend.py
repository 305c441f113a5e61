"""The narrow seam between the engine and the memory it runs on.

A backend owns buffers (``xp`` arrays of uint8) and runs the kernels of ``kernels/reference.py`` on
them. The engine hands it *host* index arrays (int64) and buffers; the backend moves what it needs
to its device. Two backends exist: ``numpy`` (host memory, numba kernels) and ``cupy`` (one CUDA
device, kernels in ``kernels/mmsb_kernels.cu``). Everything above this seam is backend-agnostic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from mmsb_dist import _cpu, limits
from mmsb_dist.errors import CapacityError

__all__ = ["Backend", "CpuBackend", "get_backend", "gpu_available"]


class Backend(ABC):
    """Interface; see CpuBackend for the reference behaviour of each method."""

    name: str
    xp: object  # the array module: numpy or cupy

    @abstractmethod
    def zeros(self, nbytes: int):
        ...

    @abstractmethod
    def upload(self, host: np.ndarray):
        """A device copy of a host array (the same array on the CPU backend: no copy)."""
        ...

    @abstractmethod
    def to_host(self, arr) -> np.ndarray:
        ...

    @abstractmethod
    def scatter_runs(self, arena, dest, src, lengths, payload, state=None) -> None:
        ...

    def scatter_spans(self, arena, dest, starts, payload, state=None) -> None:
        """scatter_runs of runs whose bytes are payload[starts[i]:starts[i + 1]]."""
        starts = np.asarray(starts)
        self.scatter_runs(arena, dest, starts[:-1], np.diff(starts), payload, state)

    @abstractmethod
    def merge_masked(self, arena, dest, src, lengths, mask_src, payload, masks) -> None:
        ...

    @abstractmethod
    def copy_runs(self, dst, dst_off, src, src_off, lengths) -> None:
        ...

    @abstractmethod
    def zero_runs(self, arena, dest, lengths) -> None:
        ...

    @abstractmethod
    def compare(self, a, b):
        """Mask (on this backend) of the bytes where ``a`` and ``b`` differ."""
        ...

    @abstractmethod
    def page_hash(self, arena, offsets, lengths) -> np.ndarray:
        """Hashes (host uint64 array) of ``arena[offsets[i]:offsets[i]+lengths[i]]``."""
        ...

    def scatter_state(self, capacity: int):
        """Per-arena scratch the scatter kernel needs (``None`` where it needs none)."""
        return None

    def synchronize(self) -> None:
        return None


_HOST_ALIGN = 4096  # CpuBackend.zeros: where a host arena starts
_NO_LENGTHS = np.zeros(0, np.int64)  # _cpu.scatter_runs: take run lengths from consecutive src


def _i64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


class CpuBackend(Backend):
    """Host memory, numba kernels. Runs the whole system where there is no GPU."""

    name = "numpy"
    xp = np

    def __init__(self, threads: int | None = None):
        import numba

        # Threads for large run scatters; numba's pool is sized from the CPU count at import.
        self.threads = max(1, min(threads or numba.config.NUMBA_NUM_THREADS,
                                  numba.config.NUMBA_NUM_THREADS, limits.cpu_scatter_threads_max))

    def zeros(self, nbytes: int) -> np.ndarray:
        """A zeroed arena starting on a memory page boundary (NumPy's own buffers start 16 bytes
        past one), so that aligned page offsets are aligned addresses: the threaded scatter
        streams whole cache lines, which needs them."""
        nbytes = int(nbytes)
        try:
            raw = np.zeros(nbytes + _HOST_ALIGN, dtype=np.uint8)
        except MemoryError as exc:
            raise CapacityError(f"cannot allocate a host arena of {nbytes} bytes") from exc
        skip = -raw.ctypes.data % _HOST_ALIGN
        return raw[skip:skip + nbytes]

    def upload(self, host: np.ndarray) -> np.ndarray:
        return host

    def to_host(self, arr) -> np.ndarray:
        return np.asarray(arr)

    def scatter_runs(self, arena, dest, src, lengths, payload, state=None) -> None:
        args = (arena, _i64(dest), _i64(src), _i64(lengths), np.ascontiguousarray(payload))
        if self.threads > 1 and len(dest) >= limits.cpu_parallel_runs_min:
            kernel = (_cpu.scatter_runs_bucketed
                      if self.threads >= limits.cpu_bucketed_scatter_threads_min
                      else _cpu.scatter_runs_parallel)
            _cpu.run_parallel(kernel, *args, self.threads)
        else:
            _cpu.scatter_runs(*args)

    def scatter_spans(self, arena, dest, starts, payload, state=None) -> None:
        self.scatter_runs(arena, dest, starts, _NO_LENGTHS, payload, state)  # lengths from starts

    def merge_masked(self, arena, dest, src, lengths, mask_src, payload, masks) -> None:
        _cpu.merge_masked(arena, _i64(dest), _i64(src), _i64(lengths), _i64(mask_src), payload, masks)

    def copy_runs(self, dst, dst_off, src, src_off, lengths) -> None:
        _cpu.copy_runs(dst, _i64(dst_off), np.ascontiguousarray(src), _i64(src_off), _i64(lengths))

    def zero_runs(self, arena, dest, lengths) -> None:
        _cpu.zero_runs(arena, _i64(dest), _i64(lengths))

    def compare(self, a, b) -> np.ndarray:
        out = np.empty((a.size + 7) // 8, dtype=np.uint8)
        _cpu.compare_into(np.ascontiguousarray(a).view(np.uint8).reshape(-1),
                          np.ascontiguousarray(b).view(np.uint8).reshape(-1), out)
        return out

    def page_hash(self, arena, offsets, lengths) -> np.ndarray:
        out = np.empty(len(offsets), dtype=np.uint64)
        words = arena.view(np.uint64) if arena.size % 8 == 0 else np.empty(0, np.uint64)
        _cpu.page_hash(arena, words, _i64(offsets), _i64(lengths), out)
        return out


_BACKENDS: dict[str, Backend] = {}


def gpu_available() -> bool:
    """True when CuPy imports and sees a CUDA device that the CUDA backend can drive: one that
    takes cooperative launches (the run scatter's second kernel needs them; every NVIDIA GPU of
    compute capability 6.0 or later does, under Linux)."""
    try:
        import cupy
        return (cupy.cuda.runtime.getDeviceCount() > 0
                and bool(cupy.cuda.Device(0).attributes.get("CooperativeLaunch", 0)))
    except Exception:  # no cupy, no driver, no device: all mean "no GPU here"
        return False


def get_backend(name: str = "auto") -> Backend:
    """``"numpy"``, ``"cupy"``, or ``"auto"`` (cupy when a GPU is visible, else numpy)."""
    if name == "auto":
        name = "cupy" if gpu_available() else "numpy"
    if name not in ("numpy", "cupy"):
        raise ValueError(f"unknown backend {name!r}: expected 'numpy', 'cupy' or 'auto'")
    if name not in _BACKENDS:
        if name == "numpy":
            _BACKENDS[name] = CpuBackend()
        else:
            from mmsb_dist._gpu import CupyBackend
            _BACKENDS[name] = CupyBackend()
    return _BACKENDS[name]
