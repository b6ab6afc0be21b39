"""Shared test configuration (tests and doctests): hypothesis profiles, seeding, doctest names.

Profiles: ``ci`` (default, fast) and ``thorough`` (``HYPOTHESIS_PROFILE=thorough``).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    # The suite's models are tiny: one intra-op thread is faster than two and far less sensitive to
    # a loaded machine. HYPERGRAD_TEST_THREADS overrides it.
    torch.set_num_threads(int(os.environ.get("HYPERGRAD_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed_and_restore_default_dtype():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    import hypergrad

    doctest_namespace["torch"] = torch
    doctest_namespace["hg"] = hypergrad
