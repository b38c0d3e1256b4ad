import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import torch  # noqa: E402

torch.set_num_threads(1)

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state (module weight initialization, any draw a
    test does not seed itself), so a fresh setup computes the same numbers on every run. Tests whose
    numbers matter seed their own draws as well."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
