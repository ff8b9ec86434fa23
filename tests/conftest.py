"""Shared fixtures: a tiny checkpoint, the demo data, one local Ray instance and one S3 server for the session."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every Ray the tests start runs on this one machine: Ray Train's watcher for drained nodes would be one more
# process per run (as for the private Ray of `phi3v-ray train`, see launch.ensure_ray).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Logical CPUs for the shared local Ray: more than the machine's 2 cores, so two 1-CPU training
# workers leave slots for Ray Data tasks (with exactly 2, a Ray Data read waits forever).
RAY_TEST_CPUS = 4


def pytest_collection_modifyitems(config, items):
    """Tests with a Ray cluster of their own run last, in their usual order: each ends the shared local Ray
    (ray_local) first, which would otherwise start again (~8 s) for the tests after it."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is not None)


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


@pytest.fixture(scope="session")
def s3():
    """An S3 server (moto) in its own process, with the bucket the tests use; AWS_ENDPOINT_URL points at it."""
    from s3_server import BUCKET, s3_server

    with s3_server() as server:
        server.client.create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="session")
def bucket(s3, demo_data, tiny_ckpt, tmp_path_factory):
    """s3://phi3v/{demo, demo-parquet, models/tiny}: what a user keeps in a bucket."""
    from s3_server import BUCKET

    from datasets_ray.shards import convert_to_shards
    from phi3v_ray.storage import upload_dir
    from phi3v_ray.weights import write_checksums

    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
    shutil.copytree(tiny_ckpt, ckpt)
    write_checksums(ckpt)
    upload_dir(ckpt, f"s3://{BUCKET}/models/tiny")
    upload_dir(demo_data, f"s3://{BUCKET}/demo")
    convert_to_shards(demo_data, ["train", "val"], f"s3://{BUCKET}/demo-parquet", shard_rows=12)
    return {"ckpt": f"s3://{BUCKET}/models/tiny", "local_ckpt": ckpt, "demo": f"s3://{BUCKET}/demo",
            "parquet": f"s3://{BUCKET}/demo-parquet"}
