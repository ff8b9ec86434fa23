"""The driver side of a training run: resolve defaults, plan, build datasets, fit, summarise.

    cfg = load_config("demo"); result = run_training(cfg)

Runs wherever the driver runs: a laptop (starts a local Ray), `ray job submit` on a cluster
(connects to it), or inside a Ray Tune trial (see tune_spaces).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

from .config import TrainConfig
from .failures import StopOnDeterministicFailure
from .lease import RunInUse, RunLease
from .storage import is_remote
from .train import Plan, train_loop_per_worker

LOCAL_MIN_CPUS = 4  # logical CPUs for a local Ray: training workers must leave slots for Ray Data


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (jobs, clusters) or start a private local one."""
    import ray

    from .console import STARTED_HERE, verbose

    if ray.is_initialized():
        return
    # Quiet: worker output stays in Ray's log files (rank 0's lines come through console.Console), and
    # ray.init's own notices (e.g. that token auth is on, as it should be) stay off the console.
    quiet = {} if verbose() else {"log_to_driver": False, "logging_level": "ERROR"}
    # Workers never look anything up on the Hub: the driver resolved the checkpoint to a directory.
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1", "HF_HUB_OFFLINE": "1"}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, **quiet)
    else:
        cpus = num_cpus or max(LOCAL_MIN_CPUS, os.cpu_count() or 1)
        # A run starts its trainers, controller and preprocessing actors at once; on a 2-core machine that
        # is over Ray's per-core startup guess, and the raylet would warn on the console every run.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(2 * cpus))
        # Ray Train starts a preemption watcher process per worker group, which watches for nodes being
        # drained; a private Ray is this one machine, whose loss ends the run anyway.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=env, **quiet)
        except Exception as err:  # Ray raises a bare Exception; its text is the only way to tell this case
            if "timed out during startup" not in str(err):
                raise
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            raise RayDidNotStart(
                f"the private local Ray did not start: its processes did not come up within Ray's 30 s "
                f"(load average {load:.1f} on {os.cpu_count()} cores). Run again when the machine is less "
                f"busy, or point RAY_ADDRESS at a running cluster") from err
        STARTED_HERE["ray"] = True


class RayDidNotStart(RuntimeError):
    """The private local Ray timed out while starting (an overloaded machine)."""


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill in what the embedded default needs: the tiny checkpoint and the demo data."""
    root = Path(cfg.resolved_storage_path) if "://" not in cfg.resolved_storage_path else Path("runs").resolve()
    changes = {}
    if cfg.checkpoint == "tiny":
        from .tiny import write_tiny_checkpoint

        path = root / "tiny-checkpoint"
        if not (path / "config.json").is_file():
            print(f"[phi3v-ray] writing a tiny random checkpoint to {path}", flush=True)
            write_tiny_checkpoint(path, seed=0, num_crops=cfg.data.num_crops)
        changes["checkpoint"] = str(path)
    if not (cfg.data.train_file or cfg.data.val_file or cfg.data.images_root):  # any run name gets the demo data
        from datasets_ray.demo import make_demo_dataset

        data = root / "demo-data"
        if not (data / "train.jsonl").is_file():
            print(f"[phi3v-ray] generating the demo data in {data}", flush=True)
            make_demo_dataset(data, seed=0)
        changes.update(train_file=str(data / "train.jsonl"), val_file=str(data / "test.jsonl"),
                       images_root=str(data / "images"))
    if changes and "://" in cfg.resolved_storage_path:
        changes = _publish_defaults(cfg.resolved_storage_path, changes)
    return cfg.replace(**changes) if changes else cfg


def _publish_defaults(store: str, changes: dict[str, str]) -> dict[str, str]:
    """storage_path on object storage: the tiny checkpoint and the demo data are uploaded next to the runs
    (once), so that nodes other than the driver's read them from there."""
    from .storage import list_files, upload_dir

    def publish(local: Path, remote: str) -> None:  # again when any file is missing or differs in size
        sizes = {rel: size for rel, (size, _) in list_files(remote).items()}
        if any(sizes.get(rel) != size for rel, (size, _) in list_files(str(local)).items()):
            print(f"[phi3v-ray] uploading {local} to {remote}", flush=True)
            upload_dir(local, remote)

    store = store.rstrip("/")
    out = dict(changes)
    if "checkpoint" in changes:
        local, remote = Path(changes["checkpoint"]), f"{store}/tiny-checkpoint"
        publish(local, remote)
        out["checkpoint"] = remote
    if "train_file" in changes:
        local, remote = Path(changes["train_file"]).parent, f"{store}/demo-data"
        publish(local, remote)
        for key in ("train_file", "val_file", "images_root"):
            out[key] = f"{remote}/{Path(changes[key]).relative_to(local).as_posix()}"
    return out


def plan_run(cfg: TrainConfig, n_train: int, n_val: int) -> Plan:
    """Optimizer steps from the record count: Ray splits the train set evenly (equal shards)."""
    run_dir = cfg.run_dir
    if cfg.eval_only:
        return Plan(total_steps=0, steps_per_epoch=0, n_train=0, n_val=n_val, run_dir=run_dir, checkpoint_dir=cfg.checkpoint)
    per_worker = n_train // cfg.num_workers
    if per_worker == 0:
        raise ValueError(f"{n_train} training records cannot feed {cfg.num_workers} workers")
    micro_batches = math.ceil(per_worker / cfg.micro_batch)
    steps_per_epoch = math.ceil(micro_batches / cfg.accumulation)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    return Plan(total_steps=total, steps_per_epoch=steps_per_epoch, n_train=n_train, n_val=n_val, run_dir=run_dir,
                checkpoint_dir=cfg.checkpoint)


def build_datasets(cfg: TrainConfig, run_dir: str | None = None):
    """The Ray Data pipelines for train (and val) from `cfg.data`; returns (datasets, n_train, n_val)."""
    import ray.data

    from datasets_ray.pipeline import DataPaths, build_dataset, manifest_count

    # Ray Data's per-operator bars would bury the per-step lines; the training loop prints its own.
    ray.data.DataContext.get_current().enable_progress_bars = False

    run_dir = run_dir or cfg.run_dir
    # Under storage_path/name on any filesystem: every node reads the manifests and writes quarantine there.
    paths = DataPaths(processor_dir=cfg.checkpoint, quarantine_dir=_quarantine_dir(cfg, run_dir),
                      work_dir=f"{run_dir.rstrip('/')}/data")
    datasets, counts = {}, {"train": 0, "val": 0}
    files = {"val": cfg.data.val_file} if cfg.eval_only else {"train": cfg.data.train_file, "val": cfg.data.val_file}
    for split, path in files.items():
        if path:
            datasets[split] = build_dataset(cfg.data, paths, [path], split, num_workers=cfg.num_workers)
            counts[split] = manifest_count(f"{paths.work_dir}/{split}.manifest.jsonl")
    return datasets, counts["train"], counts["val"]


def _quarantine_dir(cfg: TrainConfig, run_dir: str | None = None) -> str:
    return f"{(run_dir or cfg.run_dir).rstrip('/')}/quarantine"


def check_dropped(cfg: TrainConfig, good: dict[str, int], after_training: bool) -> dict[str, int]:
    """Count every dropped record (validation and decode), record the counts, fail above max_bad_fraction.

    Before training only validation drops are known; after it, decode drops too. The counts go to
    the console, `artifacts/dropped.json` and a row of metrics.jsonl.
    """
    from datasets_ray.pipeline import quarantine_report

    from .failures import DeterministicFailure
    from .storage import append_text, write_text

    qdir = _quarantine_dir(cfg)
    report = quarantine_report(qdir)
    if not report:
        return report
    print("[phi3v-ray] dropped records: " + ", ".join(f"{k} {v}" for k, v in sorted(report.items()))
          + f" (listed in {qdir})", flush=True)
    if after_training:
        write_text(f"{cfg.run_dir}/artifacts/dropped.json", json.dumps(report, indent=1))
        append_text(f"{cfg.run_dir}/artifacts/metrics.jsonl",
                    json.dumps({"step": -1, **{f"dropped/{k}": v for k, v in report.items()}}) + "\n")
    for split, n_good in good.items():
        validated = report.get(f"{split}.validate", 0)
        dropped = validated + report.get(f"{split}.decode", 0)
        total = n_good + validated
        if total and dropped / total > cfg.data.max_bad_fraction:
            raise DeterministicFailure(
                f"{qdir}: {dropped} of {total} {split} records were dropped ({dropped / total:.0%}), more than "
                f"max_bad_fraction={cfg.data.max_bad_fraction}; the reasons are in the quarantine files there")
    return report


def cache_datasets(datasets: dict, run_dir: str) -> dict:
    """cache_data: run each split's pipeline once, now; every epoch and evaluation then reads its rows
    from the object store instead of decoding again (and waiting for the first rows at each epoch).

    The splits decode side by side: each starts its own actor pool, and an actor's start (an interpreter
    importing the processor) is most of a small split's time."""
    from concurrent.futures import ThreadPoolExecutor

    from .console import native_stderr_to_log

    t0 = time.perf_counter()
    with native_stderr_to_log(run_dir), ThreadPoolExecutor(max_workers=len(datasets) or 1) as pool:
        futures = {split: pool.submit(ds.materialize) for split, ds in datasets.items()}
        cached = {split: future.result() for split, future in futures.items()}
    sizes = ", ".join(f"{split} {ds.size_bytes() / 2**20:,.0f} MiB" for split, ds in cached.items())
    print(f"[phi3v-ray] cache_data: decoded once in {time.perf_counter() - t0:.0f} s ({sizes} in the object store)",
          flush=True)
    return cached


def make_trainer(cfg: TrainConfig, plan: Plan, datasets: dict, callbacks=None, console=None):
    import ray.train
    from ray.train.torch import TorchTrainer

    execution = ray.train.DataConfig.default_ingest_options()
    execution.preserve_order = True  # a deterministic batch order is what makes exact resume possible
    if cfg.data.object_store_memory_limit:  # Train applies these options to every shard, replacing the dataset's
        execution.resource_limits = execution.resource_limits.copy(object_store_memory=cfg.data.object_store_memory_limit)
    # ScalingConfig adds the accelerator_type resource itself.
    resources = {k: v for k, v in cfg.worker_resources().items() if not k.startswith("accelerator_type:")}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "plan": asdict(plan), "console": console},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources,
            accelerator_type=cfg.accelerator_type or None,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=cfg.resolved_storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=[StopOnDeterministicFailure(), *(callbacks or [])],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[d for d in ("train",) if d in datasets],
                                            execution_options=execution),
    )


class ClusterCannotFit(RuntimeError):
    """The run asks for resources no node has and no autoscaler can add."""


def check_cluster_fits(cfg: TrainConfig) -> None:
    """Fail fast, instead of waiting forever, when no node offers what a training worker needs
    (ClusterCannotFit) or the workers would leave Ray Data too few CPUs to start (ConfigError,
    from `check_cpu_budget`).

    Skipped on autoscaling clusters (nodes of the wanted type may still come up).
    """
    import ray

    from datasets_ray.pipeline import check_cpu_budget

    if os.environ.get("PHI3V_AUTOSCALING") == "1":
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    need = {k: v for k, v in cfg.worker_resources().items() if v > 0}
    fitting = sum(min(int(n["Resources"].get(k, 0) / v) for k, v in need.items()) for n in nodes) if need else cfg.num_workers
    if fitting < cfg.num_workers:
        have = sorted({k for n in nodes for k in n["Resources"] if k in need or k.startswith("accelerator_type:")})
        raise ClusterCannotFit(
            f"run {cfg.name!r} needs {cfg.num_workers} workers with {need}, but the cluster's nodes fit {fitting}; "
            f"resources present: {have or 'none of those'}. Change num_workers / accelerator_type / worker_resource / "
            f"use_gpu, or set PHI3V_AUTOSCALING=1 on an autoscaling cluster."
        )
    check_cpu_budget(ray.cluster_resources().get("CPU", 0.0), cfg.num_workers, cfg.cpus_per_worker, cfg.data)


def prepare(cfg: TrainConfig, problems=()) -> TrainConfig:
    """The config a run starts with: paths absolute, the demo's defaults filled in, validated (with
    `problems` found earlier, e.g. unknown keys), and a resume checked against the stored settings."""
    from .resolve import absolute_paths, check_resume, fetch_hub_checkpoint

    cfg = absolute_paths(cfg)
    if not problems:
        cfg = fetch_hub_checkpoint(cfg)
    cfg = resolve_defaults(cfg).validate(problems)
    if not cfg.eval_only:
        check_resume(cfg)
    return cfg


def run_training(cfg: TrainConfig, callbacks=None, start_ray: bool = True, problems=(), relay: bool = True):
    """Validate, plan and fit; prints the evaluation before and after. Returns the Ray Train Result.

    relay=False: rank 0's lines are not sent to this process to print (see console.Console)."""
    cfg = prepare(cfg, problems)
    if start_ray:
        ensure_ray()
    check_cluster_fits(cfg)  # before building datasets: a starved Ray Data would wait forever
    from .console import Console

    t0 = time.perf_counter()
    # One writer per run directory, from the first file written (the data manifests) to the last.
    lease = RunLease(cfg.run_dir, stale_after_s=cfg.lease_stale_s).acquire()
    try:
        with Console(cfg.run_dir, relay=relay) as console:
            datasets, n_train, n_val = build_datasets(cfg)
            plan = plan_run(cfg, n_train, n_val)
            what = f"evaluate {cfg.checkpoint} on {n_val} val records" if cfg.eval_only else \
                f"{n_train} train / {n_val} val records, {plan.total_steps} optimizer steps of {cfg.effective_global_batch}"
            print(f"[phi3v-ray] run {cfg.name} ({cfg.mode}): {what}; {cfg.num_workers} worker(s) on "
                  f"{'GPU' if cfg.use_gpu else 'CPU'}; results in {plan.run_dir}", flush=True)
            dropped = check_dropped(cfg, {"train": n_train, "val": n_val}, after_training=False)
            if cfg.data.cache_data:
                datasets = cache_datasets(datasets, cfg.run_dir)
            result = make_trainer(cfg, plan, datasets, callbacks, console.queue).fit()
            dropped = check_dropped(cfg, {"train": n_train, "val": n_val}, after_training=True) or dropped
    finally:
        lease.release()
    if lease.lost:
        raise RunInUse(f"run {cfg.name}: {lease.lost} while this run trained; its files may mix both runs")
    summary = summarize_run(plan.run_dir, time.perf_counter() - t0, dropped)
    if summary:
        print(summary, flush=True)
    return result


def summarize_run(run_dir: str, elapsed: float | None = None, dropped: dict | None = None) -> str:
    """The closing summary: evaluation before/after per task, dropped records, wall time, throughput,
    and where the checkpoints, final weights, loss curve, metrics and logs are."""
    from .metrics import score_table
    from .storage import list_checkpoints, local_run_dir

    if is_remote(run_dir):
        return f"[phi3v-ray] done in {elapsed:.0f} s; results in {run_dir}" if elapsed is not None else ""
    artifacts = Path(run_dir) / "artifacts"
    evals = {}
    for tag in ("before", "after", "eval"):
        path = artifacts / "eval" / f"{tag}.json"
        if path.is_file():
            evals[tag] = {k[4:]: v for k, v in json.loads(path.read_text())["scores"].items()}
    lines = []
    if evals:
        lines.append(score_table(evals, ("accuracy", "anls", "roc_auc") if len(evals) == 1 else ("accuracy", "roc_auc")))
    rows = _metric_rows(artifacts / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    if losses:
        lines.append(f"  loss       : {losses[0]:.3f} → {losses[-1]:.3f} over {rows[-1]['step']} steps")
    speed = [r for r in rows if "tokens_per_s" in r]
    if speed:
        mean = lambda key: sum(r[key] for r in speed) / len(speed)  # noqa: E731
        lines.append(f"  throughput : {mean('tokens_per_s'):,.0f} tokens/s, {mean('images_per_s'):,.1f} images/s "
                     f"(mean of logged steps, all workers)")
    lines.append("  dropped    : " + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) + " (see quarantine/)"
                                     if dropped else "no records"))
    if elapsed is not None:
        lines.append(f"  wall time  : {elapsed:.0f} s")
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        lines.append(f"  checkpoint : {checkpoints[0]}")
        for sub in ("model", "adapter"):
            if (Path(checkpoints[0]) / sub).is_dir():
                lines.append(f"  weights    : {Path(checkpoints[0]) / sub}  (phi3v-ray export --run {run_dir} --out …)")
    if losses:
        png = plot_loss_curve(artifacts / "metrics.jsonl", artifacts / "loss_curve.png")
        if png:
            lines.append(f"  loss curve : {png}")
    lines.append(f"  metrics    : {artifacts / 'metrics.jsonl'}; logs: {local_run_dir(run_dir) / 'logs'}")
    return f"[phi3v-ray] summary of {Path(run_dir).name}\n" + "\n".join(lines)


def _metric_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("step", -1) >= 0:
                by_step.setdefault(row["step"], {}).update(row)  # a resumed run repeats steps: the last wins
    return [by_step[k] for k in sorted(by_step)]


def plot_loss_curve(metrics_file: Path, out: Path) -> Path | None:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r["loss"] for r in rows if "loss" in r}  # a resumed run repeats steps: keep the last
    points = sorted(by_step.items())
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(metrics_file.parent.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
