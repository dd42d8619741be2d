"""Shared fixture: tiny models run many small ops, so one intra-op thread is several times faster on CI's 2 cores.

Import ``one_thread`` into a test module (``from single_thread import one_thread``) to apply it there.
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run the importing module's tests with one intra-op thread, restoring the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
