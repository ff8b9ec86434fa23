"""A simulated multi-node cluster: a run out of a bucket with preprocessing on the CPU pool and training on
the GPU pool, and Tune trials on the accelerator type they ask for.

`ray.cluster_utils.Cluster` starts four real raylets on this machine: a head that runs nothing
(CPU 0, as in cluster/*.yaml), a CPU node marked `data_node` (the Ray Data pool) and two nodes
marked `gpu_pool` standing in for GPU nodes (no GPUs here: use_gpu=False, and the custom resource
does what `GPU`/`accelerator_type` does on a real cluster); one of them is an "H100" node, the other
an "L4" node (`accelerator_type:<type>`, the resource Ray puts on real GPU nodes). The "GPU" nodes
get a spare CPU each, so only the `data_node` pin, not a lack of CPUs, keeps preprocessing off them.
Each node has a cache disk of its own (PHI3V_CACHE_DIR), and the nodes share no filesystem with
the driver: the training run reads data, images and weights from the S3 server of tests/conftest.py
and writes its run there. It is full fine-tuning, so DeepSpeed ZeRO-2 shards its optimizer across
the two nodes. Which node ran what is read from Ray's state API: the Phi3VPreprocessor actors and
the manifest's read tasks (`ReadArrowJSON->...`), and the RayTrainWorker actors. The Tune sweeps here
(trials by accelerator type, and ASHA on the H100 node) read the node from each trial's reports. The
tests share the cluster: each start of four raylets costs ~20 s here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]

NODE_OBJECT_STORE = 300 * 2**20


@dataclass
class Nodes:
    ids: dict[str, str]  # node name (head, data, gpu0, gpu1) → Ray node id
    dashboard: str  # the state API's address
    disks: dict[str, Path]  # node name → its cache disk (PHI3V_CACHE_DIR)


def _free_port() -> int:
    """A free port below the kernel's ephemeral range, so no component's bind(0) takes it meanwhile."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """head (CPU 0) + data node + two gpu_pool nodes (H100, L4), each with its own cache disk; started after
    the S3 server, so every node reaches it; torn down after the module's tests."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _cluster(monkeypatch, tmp_path_factory.mktemp("node-disks"))


def _cluster(monkeypatch, disks: Path):
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the shared in-process Ray of other tests
        ray.shutdown()
    # Cluster() records its address in /tmp/ray/ray_current_cluster, where every plain ray.init() on
    # this machine looks first (other people's runs would join this cluster), and deletes that file
    # at shutdown even if someone else wrote it. Keep both to ourselves.
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    # Name this cluster in RAY_ADDRESS before any node starts: Ray's processes inherit it, and the ones
    # that look the cluster up (Train's PlacementGroupCleaner, the state API) would otherwise find
    # several Ray instances on this machine and give up.
    gcs_port, dashboard_port, agent_port = _free_port(), _free_port(), _free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{gcs_port}")
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    c = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, gcs_server_port=gcs_port, temp_dir=temp_dir, include_dashboard=True, dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port, dashboard_agent_listen_port=agent_port, object_store_memory=NODE_OBJECT_STORE,
        env_vars={"PHI3V_CACHE_DIR": str(disks / "head")},
    ))
    try:
        def node(name, **resources):
            return c.add_node(num_cpus=2, resources=resources, object_store_memory=NODE_OBJECT_STORE,
                              env_vars={"PHI3V_CACHE_DIR": str(disks / name)})

        nodes = {"data": node("data", data_node=4), "gpu0": node("gpu0", gpu_pool=1, **{"accelerator_type:H100": 1}),
                 "gpu1": node("gpu1", gpu_pool=1, **{"accelerator_type:L4": 1})}
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false"}})
        ids = {name: n.node_id for name, n in nodes.items()} | {"head": c.head_node.node_id}
        yield Nodes(ids, f"http://127.0.0.1:{dashboard_port}", {name: disks / name for name in nodes})
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_run_out_of_a_bucket_preprocesses_on_the_cpu_pool_and_trains_on_the_gpu_pool(cluster, bucket, s3, tmp_path):
    """`phi3v-ray train` (full fine-tuning, DeepSpeed ZeRO-2 on two workers) with data, images, weights and runs
    all in the bucket. The driver's working directory stays empty until the datasets are planned and is then
    deleted, before any worker, actor or read task starts, so nothing can read a driver-local path. (Ray's own
    connect and MKL's loader need the working directory to exist while the driver starts.)"""
    from ray.util.state import list_actors, list_tasks
    from s3_server import BUCKET

    from datasets_ray.pipeline import quarantine_report
    from phi3v_ray.storage import list_names, read_text

    demo = bucket["demo"]
    lines = s3.client.get_object(Bucket=BUCKET, Key="demo/train.jsonl")["Body"].read().decode().splitlines()
    lost = json.loads(lines[0])
    lost = {**lost, "id": "lost", "conversations": [{**t, "images": [f"lost/{i}.png" for i, _ in enumerate(t["images"])]}
                                                    for t in lost["conversations"]]}
    s3.client.put_object(Bucket=BUCKET, Key="mn/train.jsonl",  # 32 good records + 1 whose images are gone
                         Body=("\n".join(lines + [json.dumps(lost)]) + "\n").encode())
    runs = f"s3://{BUCKET}/runs"
    overrides = [
        "name=bucket-run", f"storage_path={runs}", f"checkpoint={bucket['ckpt']}", f"train_file=s3://{BUCKET}/mn/train.jsonl",
        f"images_root={demo}/images", f"val_file={bucket['parquet']}/val", "on_bad_record=skip",
        "num_crops=1", "precision=fp32", "attention=sdpa", "mode=full", "micro_batch=2",
        "grad_accum=1", "num_workers=2", "max_steps=2", "warmup_steps=1", "eval_before=false", "max_failures=0",
        "eval_max_samples=4", "max_new_tokens=4", "use_gpu=false", "worker_resource=gpu_pool",
        "data_node_resource=data_node", "cpus_per_worker=1.0", "preprocess_cpus=0.5", "preprocess_actors=1",
    ]
    seen_actors = {a.actor_id for a in list_actors(address=cluster.dashboard, limit=10_000, raise_on_missing_output=False)}
    seen_tasks = {t.task_id for t in list_tasks(address=cluster.dashboard, limit=10_000, raise_on_missing_output=False)}
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    cli = Path(sys.executable).parent / "phi3v-ray"
    env = dict(os.environ, PHI3V_CACHE_DIR=str(tmp_path / "driver-cache"), PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([str(cli), "train", *overrides], cwd=driver_dir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[phi3v-ray] run bucket-run "):  # the start line: datasets planned, nothing read or trained yet
            assert list(driver_dir.iterdir()) == []  # no manifest, quarantine or cache was written here
            shutil.rmtree(driver_dir)  # from now on a driver-local path would fail, on the driver and everywhere
            break
    out = "".join(lines) + proc.communicate(timeout=900)[0]
    print(out[-6000:])
    assert proc.returncode == 0, out[-4000:]
    assert not driver_dir.exists()

    run = f"{runs}/bucket-run"
    keys = [k["Key"] for k in s3.client.list_objects_v2(Bucket=BUCKET, Prefix="runs/bucket-run/")["Contents"]]
    state = sorted(k for k in keys if k.startswith("runs/bucket-run/checkpoint_") and k.endswith("train_state.json"))
    assert state and json.loads(read_text(f"s3://{BUCKET}/{state[-1]}"))["state"]["step"] == 2
    final = state[-1].rsplit("/", 1)[0]  # full fine-tuning under ZeRO-2: the whole model and each rank's optimizer shard
    assert {f"{final}/model/model.safetensors", f"{final}/model/tokenizer.json"} <= set(keys)
    assert sum(k.startswith(f"{final}/deepspeed/") and k.endswith("_optim_states.pt") for k in keys) == 2
    dropped = {k: v for k, v in quarantine_report(f"{run}/quarantine").items() if v}
    assert dropped == {"train.decode": 1}  # the record whose images are not in the bucket, named in the quarantine
    assert {k: v for k, v in json.loads(read_text(f"{run}/artifacts/dropped.json")).items() if v} == dropped
    assert {"train.manifest.jsonl", "val.manifest.jsonl"} <= set(list_names(f"{run}/data"))
    assert "runs/bucket-run/artifacts/eval/after.json" in keys  # evaluated on the Parquet val shards

    # One download per node and kind: the checkpoint and its tokenizer on each training node, the tokenizer
    # alone on the data node (however many preprocessing actors it runs).
    downloads = {name: sorted(json.loads(line)["kind"] for d in disk.rglob("downloads.log")
                              for line in d.read_text().splitlines()) for name, disk in cluster.disks.items()}
    assert downloads == {"data": ["processor"], "gpu0": ["full", "processor"], "gpu1": ["full", "processor"]}
    assert not (tmp_path / "driver-cache").exists()  # the driver never needed the weights

    actors = [a for a in list_actors(address=cluster.dashboard, detail=True, limit=10_000, raise_on_missing_output=False)
              if a.actor_id not in seen_actors]  # this run's, not those of a test before it on the cluster
    train_nodes = [a.node_id for a in actors if a.class_name == "RayTrainWorker"]
    # The autoscaling actor pool may also have asked for actors the data node had no room for (never placed).
    prep_nodes = [a.node_id for a in actors
                  if "Phi3VPreprocessor" in (a.class_name or "") + (a.repr_name or "") and a.node_id]
    tasks = [t for t in list_tasks(address=cluster.dashboard, detail=True, limit=10_000, raise_on_missing_output=False)
             if t.task_id not in seen_tasks]
    read_nodes = [t.node_id for t in tasks if t.type == "NORMAL_TASK" and (t.name or "").startswith("Read") and t.node_id]
    names = {v: k for k, v in cluster.ids.items()}
    print("training workers on", [names.get(n, n) for n in train_nodes], "| preprocessors on",
          [names.get(n, n) for n in prep_nodes], "| read tasks on", sorted({names.get(n, n) for n in read_nodes}))
    ids = cluster.ids
    assert len(train_nodes) == 2 and set(train_nodes) == {ids["gpu0"], ids["gpu1"]}  # one worker per "GPU" node
    assert prep_nodes and set(prep_nodes) == {ids["data"]}
    assert read_nodes and set(read_nodes) == {ids["data"]}


def test_trials_land_on_the_accelerator_they_ask_for_and_impossible_ones_fail_fast(cluster, tmp_path, demo_data,
                                                                                   tiny_ckpt):
    """A sweep with a trial that asks for a type no node has is refused before any trial starts; without that
    check, that trial fails by itself with the reason while the others run. The L4 trial here, the H100
    trials of the ASHA sweep below: each lands on the node of its type."""
    import time

    from test_tune import _overrides

    from phi3v_ray.launch import ClusterCannotFit
    from tune_spaces.run import run_sweep

    overrides = _overrides(tmp_path, demo_data, tiny_ckpt, max_steps=1)

    # The whole sweep refuses at once when one of its trials asks for a type no node has.
    t0 = time.time()
    with pytest.raises(ClusterCannotFit, match="A100") as err:
        run_sweep(_accelerator_space(["H100", "A100"]), scheduler="none", overrides=overrides, name="refused", verbose=0)
    assert time.time() - t0 < 30 and "accelerator_type:H100" in str(err.value)

    # Without the driver's check, that trial fails by itself with the reason; the other runs where it asked.
    t0 = time.time()
    grid = run_sweep(_accelerator_space(["L4", "A100"]), scheduler="none", overrides=overrides, name="pools",
                     precheck=False, verbose=0)
    print(f"heterogeneous sweep: {time.time() - t0:.0f} s")
    by_type = {r.config["accelerator_type"]: r for r in grid}
    assert "ClusterCannotFit" in str(by_type["A100"].error) and "A100" in str(by_type["A100"].error)
    result = by_type["L4"]
    assert result.error is None and result.metrics["step"] == 1
    assert _trial_nodes(cluster, result) == {"gpu1"}


def _accelerator_space(accelerators: list[str]):
    from tune_spaces.spaces import SweepSpace

    return SweepSpace(name="pools", preset="demo", mode="lora", metric="loss", metric_mode="min", num_samples=1,
                      params={"accelerator_type": {"grid": accelerators}, "lr": 1e-3, "lora_rank": 4})


def _trial_nodes(cluster: Nodes, result) -> set[str]:
    """The nodes (by name) a trial's worker reported from."""
    names = {v: k for k, v in cluster.ids.items()}
    return {names.get(n, n) for n in result.metrics_dataframe["node_id"].dropna()}


def test_asha_stops_poor_trials_and_writes_a_best_config_ready_to_train(cluster, tmp_path, demo_data, tiny_ckpt):
    """ASHA stops the poor trial at its rung. Its trials ask for the H100 node: with the L4 trial above, trials of
    both types land where they asked, without a sweep of their own (a trial is ~40 s of Ray start-up here)."""
    import csv
    import time

    from ray.util.placement_group import placement_group_table
    from test_tune import _overrides

    from phi3v_ray.config import load_config
    from phi3v_ray.launch import check_cluster_fits, prepare
    from tune_spaces.run import run_sweep
    from tune_spaces.spaces import SweepSpace

    # Two trials, one after the other: lr 5e-3 first (grid order), then 1e-6; the rank is sampled. The first
    # reaches the step-2 rung alone and goes on; the second arrives at the rung with a clearly higher loss
    # than the first had there, is below the cutoff (their median) and stops at step 2.
    space = SweepSpace(name="asha", preset="demo", mode="lora", metric="loss", metric_mode="min", num_samples=1,
                       params={"lr": {"grid": [5e-3, 1e-6]}, "lora_rank": {"choice": [4, 8]}, "lora_alpha_ratio": 2,
                               "accelerator_type": "H100"},
                       grace_period=2, reduction_factor=2)
    t0 = time.time()
    grid = run_sweep(space, overrides=_overrides(tmp_path, demo_data, tiny_ckpt, max_steps=3), name="asha",
                     max_concurrent=1, verbose=0)
    print(f"asha sweep: {time.time() - t0:.0f} s")

    assert len(grid) == 2 and grid.num_errors == 0
    steps = {r.config["lr"]: r.metrics["step"] for r in grid}
    assert steps == {5e-3: 3, 1e-6: 2}, steps  # only the poor learning rate is stopped, at the rung
    assert all(r.metrics["training_iteration"] == r.metrics["step"] for r in grid)  # one report per step
    assert all(_trial_nodes(cluster, r) == {"gpu0"} for r in grid)  # the H100 node
    # The stopped trial's worker placement group was released (its controller never got to it).
    groups = {g for r in grid for g in r.metrics_dataframe["placement_group_id"].dropna()}
    assert len(groups) == 2 and all(placement_group_table()[g]["state"] == "REMOVED" for g in groups)

    exp = tmp_path / "runs" / "asha"
    rows = list(csv.DictReader((exp / "results.csv").open()))
    assert len(rows) == 2 and sorted(r["status"] for r in rows) == ["DONE", "STOPPED"]
    assert {"lr", "lora_rank", "lora_alpha", "loss", "step"} <= set(rows[0])
    assert (exp / "sweep.png").stat().st_size > 1000

    # The best config passes every check `phi3v-ray train --config` makes before a worker starts (its files, its
    # settings, this cluster); training it would be one more ~40 s Ray run of what the trials just did.
    best = load_config(str(exp / "best_config.yaml"))
    assert best.lr == 5e-3 and best.lora_alpha == 2 * best.lora_rank and best.name == "asha-best"
    assert best.accelerator_type == "H100"
    ready = prepare(best.replace(storage_path=str(tmp_path / "best")))
    check_cluster_fits(ready)
    assert (ready.lr, ready.lora_rank, ready.mode, ready.max_steps) == (5e-3, best.lora_rank, "lora", 3)
