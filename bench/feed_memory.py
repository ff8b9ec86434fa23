"""Host memory of a training worker's feed alone: the demo's cached training split iterated as a
worker iterates it (packed micro-batches of 4, collated 2 ahead, 2 epochs), with three shuffles:

    none           file order: the floor (Ray Data's batches as they come)
    ray local 64   Ray Data's own seeded local shuffle buffer (`iter_batches(local_shuffle_buffer_size=64)`),
                   what the worker used before 2026-11-30
    rows 64        `phi3v_ray.grouping.shuffle_rows`: a buffer of 64 rows the worker owns (today's default)

Each variant runs in a fresh process (getrusage's peak is per process) on the same materialized
dataset, and reports its resident memory before iterating, the largest sampled at a batch, and the
process's peak.

    python bench/feed_memory.py                   # prints the table
    python bench/feed_memory.py --out bench/results/feed_memory_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("none", "ray local 64", "rows 64")


def _batches(train, variant: str, epoch: int):
    """Collated micro-batches of one epoch, shuffled as `variant` says."""
    from phi3v_ray.collate import Phi3VCollate, iter_train_batches

    collate = Phi3VCollate(packing=True)
    if variant == "ray local 64":  # the old path: Ray Data's shuffle buffer, then collate
        for batch in train.iter_batches(batch_size=4, batch_format="numpy", local_shuffle_buffer_size=64,
                                        local_shuffle_seed=epoch):
            yield collate(batch)
        return
    buffer = 64 if variant == "rows 64" else 0
    yield from iter_train_batches(train, 4, epoch=epoch, seed=0, shuffle_buffer=buffer, collate_fn=collate,
                                  collate_ahead=2)


def measure(workdir: Path, variant: str) -> dict:
    """One variant in this process: materialize the demo's train split, iterate it twice."""
    import resource

    import psutil

    from bench.ray_overhead import _config
    from phi3v_ray.launch import build_datasets, ensure_ray
    from phi3v_ray.train import trim_host_heap

    cfg = _config(workdir, workdir / "tiny", workdir / "data", 60, 4, name="feed", num_workers=1)
    ensure_ray()
    datasets, _, _ = build_datasets(cfg, run_dir=str(workdir / "runs" / "feed"))
    train = datasets["train"].materialize()
    proc = psutil.Process()
    trim_host_heap()
    before = proc.memory_info().rss / 2**30
    largest, batches, t0 = before, 0, time.perf_counter()
    for epoch in range(2):
        for _ in _batches(train, variant, epoch):
            largest = max(largest, proc.memory_info().rss / 2**30)
            batches += 1
    return {"variant": variant, "batches": batches, "seconds": time.perf_counter() - t0,
            "rss_before_gb": before, "rss_max_gb": largest,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="phi3v-ray-feed-"))
    if args.variant:
        print(json.dumps(measure(workdir, args.variant)))
        return 0

    from datasets_ray.demo import make_demo_dataset
    from phi3v_ray.tiny import write_tiny_checkpoint

    if not (workdir / "tiny" / "config.json").is_file():
        write_tiny_checkpoint(workdir / "tiny", seed=0, num_crops=1)
    if not (workdir / "data" / "train.jsonl").is_file():
        make_demo_dataset(workdir / "data", seed=0)
    results = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--variant", variant],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'shuffle':<14}{'batches':>8}{'seconds':>9}{'RSS before':>12}{'RSS max':>9}{'peak':>7}  (GB)")
    for r in results:
        print(f"{r['variant']:<14}{r['batches']:>8}{r['seconds']:>9.1f}{r['rss_before_gb']:>12.2f}"
              f"{r['rss_max_gb']:>9.2f}{r['peak_rss_gb']:>7.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": "python bench/feed_memory.py --out " + args.out, "date": time.strftime("%Y-%m-%d"),
            "note": "the demo's cached train split (240 rows), packed micro-batches of 4, 2 epochs, one process each",
            "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
