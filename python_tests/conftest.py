"""Shared test setup: fixed seeds, and the `gpu` marker skipped without CUDA.

``--torch-seed N`` changes the seed every test starts from (default 0), so the
suite's tolerances can be shaken with other data (issue 10); hypothesis seeds
vary with ``--hypothesis-seed``."""
import pytest
import torch


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
