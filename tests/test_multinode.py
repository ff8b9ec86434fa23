"""Placement on a simulated multi-node cluster: preprocessing on the CPU pool, training on the GPU pool,
and Tune trials on the accelerator type they ask for.

`ray.cluster_utils.Cluster` starts four real raylets on this machine: a head that runs nothing
(CPU 0, as in cluster/*.yaml), a CPU node marked `data_node` (the Ray Data pool) and two nodes
marked `gpu_pool` standing in for GPU nodes (no GPUs here: use_gpu=False, and the custom resource
does what `GPU`/`accelerator_type` does on a real cluster); one of them is an "H100" node, the other
an "L4" node (`accelerator_type:<type>`, the resource Ray puts on real GPU nodes). The "GPU" nodes
get a spare CPU each, so only the `data_node` pin, not a lack of CPUs, keeps preprocessing off them.
The training run is full fine-tuning, so DeepSpeed ZeRO-2 shards its optimizer across the two
nodes. Which node ran what is read from Ray's state API: the Phi3VPreprocessor actors and the
manifest's read tasks (`ReadArrowJSON->...`), and the RayTrainWorker actors. Both tests share the
cluster: each start of four raylets costs ~20 s here.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from phi3v_ray.config import TrainConfig
from phi3v_ray.launch import run_training

pytestmark = pytest.mark.slow

NODE_OBJECT_STORE = 300 * 2**20


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
def cluster():
    """head (CPU 0) + data node + two gpu_pool nodes (H100, L4); torn down after the module's tests."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _cluster(monkeypatch)


def _cluster(monkeypatch):
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
    ))
    try:
        nodes = {
            "data": c.add_node(num_cpus=2, resources={"data_node": 4}, object_store_memory=NODE_OBJECT_STORE),
            "gpu0": c.add_node(num_cpus=2, resources={"gpu_pool": 1, "accelerator_type:H100": 1},
                               object_store_memory=NODE_OBJECT_STORE),
            "gpu1": c.add_node(num_cpus=2, resources={"gpu_pool": 1, "accelerator_type:L4": 1},
                               object_store_memory=NODE_OBJECT_STORE),
        }
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false"}})
        ids = {name: node.node_id for name, node in nodes.items()} | {"head": c.head_node.node_id}
        yield c, ids, f"http://127.0.0.1:{dashboard_port}"
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_preprocessing_on_the_cpu_pool_training_on_the_gpu_pool(cluster, tmp_path, demo_data, tiny_ckpt):
    from ray.util.state import list_actors, list_tasks

    c, ids, dashboard = cluster
    cfg = TrainConfig.from_flat(
        name="multinode", storage_path=str(tmp_path / "runs"), checkpoint=str(tiny_ckpt),
        train_file=str(demo_data / "train.jsonl"), images_root=str(demo_data / "images"),
        num_crops=1, precision="fp32", attention="sdpa", mode="full",
        micro_batch=2, grad_accum=1, num_workers=2, max_steps=2, warmup_steps=1, eval_before=False, max_failures=0,
        use_gpu=False, worker_resource="gpu_pool", data_node_resource="data_node", cpus_per_worker=1.0,
        preprocess_cpus=0.5,
    )
    seen_actors = {a.actor_id for a in list_actors(address=dashboard, limit=10_000, raise_on_missing_output=False)}
    seen_tasks = {t.task_id for t in list_tasks(address=dashboard, limit=10_000, raise_on_missing_output=False)}
    result = run_training(cfg, start_ray=False)
    final = Path(result.checkpoint.path)
    state = json.loads((final / "train_state.json").read_text())
    assert state["state"]["step"] == 2
    # Full fine-tuning runs under DeepSpeed ZeRO-2 by default: its optimizer shards, one per rank, from two nodes.
    assert (final / "model" / "model.safetensors").is_file() and (final / "model" / "tokenizer.json").is_file()
    assert len(list((final / "deepspeed").glob("*zero_pp_rank_*_optim_states.pt"))) == 2

    actors = [a for a in list_actors(address=dashboard, detail=True, limit=10_000, raise_on_missing_output=False)
              if a.actor_id not in seen_actors]  # this run's, not those of a test before it on the cluster
    train_nodes = [a.node_id for a in actors if a.class_name == "RayTrainWorker"]
    # The autoscaling actor pool may also have asked for actors the data node had no room for (never placed).
    prep_nodes = [a.node_id for a in actors
                  if "Phi3VPreprocessor" in (a.class_name or "") + (a.repr_name or "") and a.node_id]
    tasks = [t for t in list_tasks(address=dashboard, detail=True, limit=10_000, raise_on_missing_output=False)
             if t.task_id not in seen_tasks]
    read_nodes = [t.node_id for t in tasks if t.type == "NORMAL_TASK" and (t.name or "").startswith("Read") and t.node_id]
    names = {v: k for k, v in ids.items()}
    print("training workers on", [names.get(n, n) for n in train_nodes], "| preprocessors on",
          [names.get(n, n) for n in prep_nodes], "| read tasks on", sorted({names.get(n, n) for n in read_nodes}))

    assert len(train_nodes) == 2 and set(train_nodes) == {ids["gpu0"], ids["gpu1"]}  # one worker per "GPU" node
    assert prep_nodes and set(prep_nodes) == {ids["data"]}
    assert read_nodes and set(read_nodes) == {ids["data"]}


def test_trials_land_on_the_accelerator_they_ask_for_and_impossible_ones_fail_fast(cluster, tmp_path, demo_data,
                                                                                   tiny_ckpt):
    import time

    from test_tune import _overrides

    from phi3v_ray.launch import ClusterCannotFit
    from tune_spaces.run import run_sweep
    from tune_spaces.spaces import SweepSpace

    _, ids, _ = cluster
    kinds = {ids["gpu0"]: "H100", ids["gpu1"]: "L4"}

    def space(accelerators):
        return SweepSpace(name="pools", preset="demo", mode="lora", metric="loss", metric_mode="min", num_samples=1,
                          params={"accelerator_type": {"grid": accelerators}, "lr": 1e-3, "lora_rank": 4})

    overrides = _overrides(tmp_path, demo_data, tiny_ckpt, max_steps=1)

    # The whole sweep refuses at once when one of its trials asks for a type no node has.
    t0 = time.time()
    with pytest.raises(ClusterCannotFit, match="A100") as err:
        run_sweep(space(["H100", "A100"]), scheduler="none", overrides=overrides, name="refused", verbose=0)
    assert time.time() - t0 < 30 and "accelerator_type:H100" in str(err.value)

    # Without the driver's check, that trial fails by itself with the reason; the others run where they asked.
    t0 = time.time()
    grid = run_sweep(space(["H100", "L4", "A100"]), scheduler="none", overrides=overrides, name="pools",
                     precheck=False, verbose=0)
    print(f"heterogeneous sweep: {time.time() - t0:.0f} s")
    by_type = {r.config["accelerator_type"]: r for r in grid}
    assert "ClusterCannotFit" in str(by_type["A100"].error) and "A100" in str(by_type["A100"].error)
    for kind in ("H100", "L4"):
        result = by_type[kind]
        assert result.error is None and result.metrics["step"] == 1
        node_id = result.metrics_dataframe["node_id"].dropna().iloc[0]
        assert kinds.get(node_id) == kind, (kind, node_id, kinds)
