"""Kernel sources and their definition.

``reference.py`` is the NumPy specification of every kernel; ``mmsb_kernels.cu`` holds the CUDA C++
implementations that the CuPy backend compiles at first use (NVRTC, through ``cupy.RawModule``).
Installed, this folder is the package ``mmsb_dist.kernels`` inside the wheel.
"""

from importlib import resources


def cuda_source(name: str = "mmsb_kernels.cu") -> str:
    """The text of a CUDA source file shipped with the package."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
