import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Under pytest-xdist each worker gets one core; alone, use up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
