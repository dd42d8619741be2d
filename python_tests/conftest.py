"""Shared test setup: fixed seeds, the `gpu` marker skipped without CUDA, and the ``one_thread`` fixture.

``--torch-seed N`` changes the seed every test starts from (default 0), so the
suite's tolerances can be shaken with other data; hypothesis seeds
vary with ``--hypothesis-seed``. torch.compile's cache is private to the session (its workers share it).
A module opts into one intra-op thread with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
import os
import shutil
import tempfile

import pytest
import torch

# A fresh torch.compile cache per session (unless one is given), removed at its end: compiled
# graphs cached by an earlier run of other code (another branch, an older op schema) are
# otherwise reused and fail.
SESSION_COMPILE_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    SESSION_COMPILE_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tidar-inductor-")


# Under pytest-xdist (scripts/test.sh runs two workers) the workers share the cores: each takes its share
# of intra-op threads, since more threads than cores spin against each other.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_unconfigure(config):
    if SESSION_COMPILE_CACHE is not None:
        shutil.rmtree(SESSION_COMPILE_CACHE, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--torch-seed", type=int, default=0, help="torch.manual_seed at the start of every test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(request.config.getoption("--torch-seed"))


@pytest.fixture(scope="module")
def one_thread():
    """Run the requesting module's tests with one intra-op thread, restoring the count afterwards: tiny
    models run many small ops, so one thread is several times faster on CI's 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
