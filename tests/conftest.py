"""Shared fixtures: a tiny checkpoint, the demo data, and one local Ray instance for the session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Logical CPUs for the shared local Ray: more than the machine's 2 cores, so two 1-CPU training
# workers leave slots for Ray Data tasks (with exactly 2, a Ray Data read waits forever).
RAY_TEST_CPUS = 4


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from phi3v_ray.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0, num_crops=1)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from datasets_ray.demo import make_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_dataset(out, n_train=32, n_val=8, n_test=8, seed=0)
    return out


@pytest.fixture
def ray_local():
    """A local Ray instance shared by the tests that need one (started on first use)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=RAY_TEST_CPUS, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
