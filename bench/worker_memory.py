"""Host memory of a training worker over a finished run, from rank 0's rows in metrics.jsonl.

Every logged step records the worker's resident set (`host_rss_gb`, which counts shared pages),
the shared-memory part of it (`host_shm_gb`: rows of Ray's object store read without a copy), its
unique memory (`host_uss_gb`, read every ~30 s, just after the C heap gave its free pages back) and
the process's peak resident set so far (`peak_mem_gb`, getrusage's ru_maxrss on a CPU worker).

    phi3v-ray train                                        # the demo
    python bench/worker_memory.py runs/phi3v-demo          # its worker's memory
    python bench/worker_memory.py runs/a runs/b --out bench/results/worker_memory_demo.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def summarise(run_dir: Path) -> dict:
    metrics = run_dir / "artifacts" / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"{metrics}: not found (is {run_dir} a finished run directory?)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "host_rss_gb" in r]
    if not rows:
        raise SystemExit(f"{metrics}: no host memory in its rows (a GPU run logs device memory instead)")
    rss = [r["host_rss_gb"] for r in rows]
    return {
        "run": str(run_dir), "logged_steps": len(rows),
        "rss_median_gb": statistics.median(rss), "rss_max_gb": max(rss),
        "uss_max_gb": max(r.get("host_uss_gb", 0.0) for r in rows),
        "shm_max_gb": max(r.get("host_shm_gb", 0.0) for r in rows),
        "peak_rss_gb": max(r.get("peak_mem_gb", 0.0) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (storage_path/name)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = [summarise(run) for run in args.runs]
    print(f"{'run':<40} {'RSS median':>10} {'RSS max':>8} {'USS max':>8} {'shm max':>8} {'peak RSS':>9}  (GB)")
    for r in results:
        print(f"{r['run'][-40:]:<40} {r['rss_median_gb']:>10.2f} {r['rss_max_gb']:>8.2f} {r['uss_max_gb']:>8.2f} "
              f"{r['shm_max_gb']:>8.2f} {r['peak_rss_gb']:>9.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": "python bench/worker_memory.py " + " ".join(sys.argv[1:]),
                                        "date": time.strftime("%Y-%m-%d"), "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
