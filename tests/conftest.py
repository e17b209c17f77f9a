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


# Property-based tests (tests/frontend/test_promises_*.py): "ci" (the default) keeps each to a few
# examples so the suite stays fast; HYPOTHESIS_PROFILE=long explores far more, for local runs.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
