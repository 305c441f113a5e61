"""Shared fixtures. ``backend`` runs one test body on every backend this machine has: the NumPy
backend always, the CuPy backend (marker ``gpu``) only where a CUDA device is visible."""

import os
import zlib

import numpy as np
import pytest

from mmsb_dist.backend import get_backend, gpu_available

_HAVE_GPU = gpu_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="no CUDA GPU visible (CuPy backend)")
    for item in items:
        if "gpu" in item.keywords and not _HAVE_GPU:
            item.add_marker(skip)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request):
    if request.param == "cupy" and not _HAVE_GPU:
        pytest.skip("no CUDA GPU visible")
    return get_backend(request.param)


@pytest.fixture
def rng(request):
    # One seed per test, derived from the test id (a stable hash: str hash() changes between
    # processes, which made a failure unrepeatable), overridden with MMSB_SEED.
    seed = int(os.environ.get("MMSB_SEED", zlib.crc32(request.node.nodeid.encode())))
    return np.random.default_rng(seed)
