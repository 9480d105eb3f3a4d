"""Shared fixtures: a small TinyWorld built once per test session (cached under .cache/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("ITERATIVE_RLHF_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from iterative_rlhf._quiet import cpu_threads  # noqa: E402

cpu_threads()  # one torch thread: tiny models, shared cores (see bench/README.md)

REPO = Path(__file__).resolve().parents[1]
TEST_CACHE = REPO / ".cache" / "tests"


def small_world_config():
    """A TinyWorld small enough to build in well under a minute: the tests' world."""
    from iterative_rlhf.config import TinyWorldConfig

    return TinyWorldConfig(cache_dir=str(TEST_CACHE), corpus_size=6000, train_steps=500, hidden_size=64,
                           num_layers=2, num_heads=2, comparisons_per_prompt=4, safety_comparisons_per_prompt=12,
                           samples_per_prompt=2)


def helper_up(helper, timeout: float = 180.0):
    """Wait until a ``workers.Helper``'s process takes work (the fork server may still be importing)."""
    import time

    deadline = time.monotonic() + timeout
    while not helper.ready():
        assert helper.error is None, helper.error
        assert time.monotonic() < deadline, "the helper process did not start"
        time.sleep(0.05)
    return helper


@pytest.fixture(scope="session")
def world_config():
    return small_world_config()


@pytest.fixture(scope="session")
def world():
    """Paths of the tests' TinyWorld (policy, prompts, comparisons), built on first use."""
    from iterative_rlhf.tinyworld.build import build_world

    return build_world(small_world_config())


@pytest.fixture
def one_thread():
    """One torch thread for the test, even when OMP_NUM_THREADS asked for more: on 2 shared cores, OpenMP
    spin-waits of a second thread slow these small models down."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
