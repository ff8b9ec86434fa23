"""What Ray costs the training loop, in time and memory: the same tiny-model run as a bare loop and
through `run_training`.

    bare         one process, no Ray in the loop: load_model + build_engine + train_step over the
                 micro-batches the 1-worker run trains on, in its order (taken from the same Ray Data
                 pipeline and collated before the clock starts), torch at 1 thread as a 1-CPU Ray
                 worker gets. The same records matter: a demo step costs 0.1-1 s by its record
                 (one image or 8 frames), so two loops over different records differ by ±15 %.
    ray 1 worker run_training with 1 worker: Ray Data feed, DDP engine, logging, reports at the cadence
    ray 2 workers the same with 2 workers (gloo), each with the same micro batch
    ... per-step  the 1-worker run reporting to Ray every step (report_every_s=0): the old behaviour
    ... in the loop  the 1-worker run collating in the training loop (collate_ahead=0): the old feed

Seconds per step are measured over the same steady window in each: from the end of step `--warmup`
to the end of the last step (the Ray runs from the `wall_time` of rank 0's rows in metrics.jsonl),
so start-up (Ray, actors, model load) is left out and everything in the loop is counted. Memory is
the training process's host memory at the end (bare) or the largest logged by rank 0: resident
(RSS, which counts shared pages such as Ray's object store) and unique (USS, what the process alone holds).

    python bench/ray_overhead.py                          # 40 steps, micro batch 4: prints the table
    python bench/ray_overhead.py --out bench/results/ray_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _config(workdir: Path, ckpt: Path, data: Path, steps: int, micro_batch: int, **changes):
    from phi3v_ray.config import load_config

    return load_config("demo", {
        "name": "bench", "storage_path": str(workdir / "runs"), "checkpoint": str(ckpt),
        "train_file": str(data / "train.jsonl"), "images_root": str(data / "images"), "val_file": "",
        "max_steps": steps, "epochs": 100, "micro_batch": micro_batch, "log_every": 1, "eval_before": False,
        "checkpoint_every": 0, "max_failures": 0,
        # As measured before the demo preset changed: full fine-tuning, one CPU (and one torch thread) per worker.
        "mode": "full", "cpus_per_worker": 1, **changes,
    })


def _memory_gb() -> dict[str, float]:
    import psutil

    info = psutil.Process().memory_full_info()
    return {"rss_gb": info.rss / 2**30, "uss_gb": info.uss / 2**30}


def training_batches(cfg, steps: int) -> list[dict]:
    """The first `steps` collated micro-batches a 1-worker run of `cfg` trains on, in its order: the
    same pipeline (`build_datasets`) and the same seeded iteration (`iter_train_batches`)."""
    import shutil

    from phi3v_ray.collate import Phi3VCollate, iter_train_batches
    from phi3v_ray.launch import build_datasets

    datasets, _, _ = build_datasets(cfg, run_dir=f"{cfg.run_dir}-feed")
    batches = []
    for batch in iter_train_batches(datasets["train"], cfg.micro_batch, epoch=0, seed=cfg.seed,
                                    length_window=cfg.length_grouping_window, collate_fn=Phi3VCollate()):
        batches.append(batch)
        if len(batches) == steps:
            break
    shutil.rmtree(f"{cfg.run_dir}-feed", ignore_errors=True)
    return batches


def bare_loop(cfg, batches: list[dict], warmup: int) -> dict:
    """Seconds per step of the engine alone on pre-collated batches."""
    import torch

    from phi3v_ray.engine import build_engine, train_step
    from phi3v_ray.hardware import resolve_hardware
    from phi3v_ray.train import load_model

    torch.set_num_threads(1)
    steps = len(batches)
    hw = resolve_hardware(None, cfg.precision, cfg.attention)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg, hw, torch.device("cpu"), cfg.checkpoint)
    engine = build_engine(cfg, model, steps, hw.precision, torch.device("cpu"), world_size=1)
    ends = []
    for batch in batches:
        out = train_step(engine, [batch])
        float(out.loss_sum)  # the Ray loop reads the loss at every logged step too
        ends.append(time.perf_counter())
    return {"s_per_step": (ends[-1] - ends[warmup - 1]) / (len(ends) - warmup), **_memory_gb()}


def ray_loop(cfg, warmup: int) -> dict:
    """Seconds per step of `run_training`, from rank 0's logged rows, and how often it reported."""
    from phi3v_ray.launch import run_training

    run_training(cfg, start_ray=False)
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "artifacts" / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["wall_time"] for r in rows if "loss" in r}
    last = max(times)
    return {"s_per_step": (times[last] - times[warmup]) / (last - warmup), "steps": last,
            "rss_gb": max(r.get("host_rss_gb", 0.0) for r in rows), "uss_gb": max(r.get("host_uss_gb", 0.0) for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from datasets_ray.demo import make_demo_dataset
    from phi3v_ray.launch import ensure_ray
    from phi3v_ray.tiny import write_tiny_checkpoint

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="phi3v-ray-overhead-"))
    ckpt, data = workdir / "tiny", workdir / "data"
    if not (ckpt / "config.json").is_file():
        write_tiny_checkpoint(ckpt, seed=0, num_crops=1)
    if not (data / "train.jsonl").is_file():
        make_demo_dataset(data, seed=0)

    def cfg(name: str, **changes):
        return _config(workdir, ckpt, data, args.steps, args.micro_batch, name=name, **changes)

    ensure_ray()
    bare_cfg = cfg("bare", num_workers=1)
    results = {"bare": bare_loop(bare_cfg, training_batches(bare_cfg, args.steps), args.warmup)}
    runs = {
        "ray 1 worker": cfg("ray1", num_workers=1),
        "ray 2 workers": cfg("ray2", num_workers=2),
        "ray 1 worker, report every step": cfg("ray1-every", num_workers=1, report_every_s=0),
        "ray 1 worker, collate in the loop": cfg("ray1-inline", num_workers=1, collate_ahead=0),
    }
    for label, run_cfg in runs.items():
        results[label] = ray_loop(run_cfg, args.warmup)
        results[label]["load_avg_1m"] = os.getloadavg()[0]

    bare = results["bare"]["s_per_step"]
    print(f"\n{'loop':<34} {'s/step':>8} {'× bare':>8} {'RSS GB':>8} {'USS GB':>8}")
    for label, r in results.items():
        print(f"{label:<34} {r['s_per_step']:>8.3f} {r['s_per_step'] / bare:>8.2f} {r['rss_gb']:>8.2f} {r['uss_gb']:>8.2f}")
    if args.out:
        record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "steps": args.steps, "warmup": args.warmup, "micro_batch": args.micro_batch,
                  "s_per_step": {k: r["s_per_step"] for k, r in results.items()},
                  "ratio_to_bare": {k: r["s_per_step"] / bare for k, r in results.items()},
                  "host_memory_gb": {k: {"rss": r["rss_gb"], "uss": r["uss_gb"]} for k, r in results.items()},
                  "load_avg_1m_after": {k: r["load_avg_1m"] for k, r in results.items() if "load_avg_1m" in r},
                  "command": " ".join(["python", *sys.argv])}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
