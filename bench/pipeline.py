"""Data pipeline throughput: the Ray Data pipeline with 1 and 2 preprocessing actors against the
processor in a plain Python loop, on the demo data and a tiny checkpoint (nothing downloaded).

Every variant ends at the same place, collated micro batches of torch tensors (right padding):

    plain        build_example per record (open images, HD crops, tokenize) + collate, one process,
                 torch at --torch-threads (default 1, as Ray gives a 1-CPU actor: OMP_NUM_THREADS=1)
    ray Nx1cpu   build_dataset → N actors × 1 CPU each → iter_train_batches (driver collates)

"wall" includes Ray Data start-up (actor start, processor load); "steady" counts the records after
the first batch over the time after it, which is what a long epoch sees. The demo cycles 1-, 2-,
8- and 1-image records, so at --num-crops 4 an average record carries 3 images × 6.8 MB of pixels.

    python bench/pipeline.py                                   # 200 records, num_crops 4, actors 1 and 2
    python bench/pipeline.py --records 400 --num-crops 16 --actors 1,2 --out bench/results/pipeline.json
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

from PIL import Image  # noqa: E402

from datasets_ray.demo import make_demo_dataset  # noqa: E402
from datasets_ray.pipeline import DataPaths, build_dataset, recommended_ray_init_cpus  # noqa: E402
from datasets_ray.schema import iter_jsonl  # noqa: E402
from phi3v_ray.collate import collate, iter_train_batches  # noqa: E402
from phi3v_ray.config import DataConfig  # noqa: E402
from phi3v_ray.examples import build_example  # noqa: E402
from phi3v_ray.processor import Phi3VProcessor  # noqa: E402
from phi3v_ray.tiny import write_tiny_checkpoint  # noqa: E402


def run_plain(data: DataConfig, paths: DataPaths, micro_batch: int, torch_threads: int) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        return _run_plain(data, paths, micro_batch)
    finally:
        torch.set_num_threads(threads)


def _run_plain(data: DataConfig, paths: DataPaths, micro_batch: int) -> dict:
    t0 = time.perf_counter()
    processor = Phi3VProcessor.from_pretrained(paths.processor_dir, num_crops=data.num_crops)
    t_load = time.perf_counter()
    root = Path(data.images_root)
    records = [json.loads(text) for _, text in iter_jsonl(data.train_file)]
    rows, n, t_first = [], 0, None
    for rec in records:
        images = [Image.open(root / rel).convert("RGB") for turn in rec["conversations"] for rel in turn["images"]]
        ex = build_example(processor, rec["conversations"], images, max_length=data.max_length)
        rows.append({"input_ids": ex.input_ids, "labels": ex.labels, "pixel_values": ex.pixel_values, "image_sizes": ex.image_sizes})
        if len(rows) == micro_batch:
            collate(rows)
            n += len(rows)
            rows = []
            t_first = t_first or time.perf_counter()
    if rows:
        collate(rows)
        n += len(rows)
    t_end = time.perf_counter()
    return _timings("plain", n, n - micro_batch, t0, t_first or t_end, t_end, startup_s=t_load - t0)


def run_ray(data: DataConfig, paths: DataPaths, micro_batch: int) -> dict:
    t0 = time.perf_counter()
    ds = build_dataset(data, paths)
    n = n_first = 0
    t_first = None
    for batch in iter_train_batches(ds, micro_batch=micro_batch, epoch=0, seed=0, shuffle_buffer=None):
        n += batch["input_ids"].shape[0]
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
    t_end = time.perf_counter()
    return _timings(f"ray {data.actor_pool[1]}x{data.preprocess_cpus:g}cpu", n, n - n_first, t0, t_first, t_end)


def _timings(name, n, n_after_first, t0, t_first, t_end, startup_s=None) -> dict:
    steady = n_after_first / (t_end - t_first) if t_end > t_first and n_after_first > 0 else float("nan")
    return {
        "variant": name, "records": n, "wall_s": round(t_end - t0, 2), "first_batch_s": round(t_first - t0, 2),
        "records_per_s": round(n / (t_end - t0), 2), "steady_records_per_s": round(steady, 2),
        "load_avg_1m": round(os.getloadavg()[0], 1),  # other work on the machine skews every number
        **({"startup_s": round(startup_s, 2)} if startup_s is not None else {}),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200, help="demo records (cycling 1, 2, 8, 1 images)")
    ap.add_argument("--num-crops", type=int, default=4, help="HD crop budget per image, 1..16")
    ap.add_argument("--actors", default="1,2", help="comma-separated actor counts (1 CPU each)")
    ap.add_argument("--micro-batch", type=int, default=4, help="records per collated batch")
    ap.add_argument("--batch-size", type=int, default=4, help="records per map_batches call")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads for the plain loop")
    ap.add_argument("--workdir", default=None, help="where data and checkpoint go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the results as json here")
    args = ap.parse_args(argv)

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    ckpt, demo = work / "ckpt", work / "data"
    if not (ckpt / "tokenizer.json").is_file():
        write_tiny_checkpoint(ckpt, num_crops=args.num_crops)
    if not (demo / "train.jsonl").is_file() or sum(1 for _ in iter_jsonl(demo / "train.jsonl")) != args.records:
        make_demo_dataset(demo, n_train=args.records, n_val=0, n_test=0)
    actors = [int(a) for a in args.actors.split(",")]
    paths = DataPaths(processor_dir=str(ckpt), work_dir=str(work / "manifests"))

    def data_config(n_actors: int) -> DataConfig:
        return DataConfig(
            train_file=str(demo / "train.jsonl"), images_root=str(demo / "images"), num_crops=args.num_crops,
            preprocess_actors=n_actors, preprocess_cpus=1.0, preprocess_batch_size=args.batch_size,
        )

    results = [run_plain(data_config(1), paths, args.micro_batch, args.torch_threads)]  # also warms the page cache
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=recommended_ray_init_cpus(0, 0, data_config(max(actors))), include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    for n in actors:
        results.append(run_ray(data_config(n), paths, args.micro_batch))
    ray.shutdown()

    print(f"\n{args.records} demo records, num_crops {args.num_crops}, micro batch {args.micro_batch}, "
          f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    cols = ("variant", "records", "wall_s", "first_batch_s", "records_per_s", "steady_records_per_s", "load_avg_1m")
    print("  ".join(f"{c:>20}" for c in cols))
    for r in results:
        print("  ".join(f"{r[c]!s:>20}" for c in cols))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"records": args.records, "num_crops": args.num_crops, "micro_batch": args.micro_batch,
                   "cores": os.cpu_count(), "results": results}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
