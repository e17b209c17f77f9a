import os
import sys

import pytest
import torch

# Triton reads TRITON_INTERPRET when its kernels are first imported, and any test module may
# import them first: without a GPU, every test process runs the kernels in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
# Under pytest-xdist each worker gets one core; alone, use up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
