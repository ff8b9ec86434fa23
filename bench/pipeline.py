"""Data feed throughput: DocVQA-shaped pages through the Ray Data pipeline, before and after.

"Before" is the float32 row layout (`pixel_format=float32`: the model's pixel_values, 17 slots of
3×336×336 float32 per 16-crop page, normalised and globally resized on the CPU); "after" is the
default uint8 layout (`pixel_format=uint8`: the page's real HD crops as uint8, normalised and
resized on the training device by `phi3v_ray.processor.pixel_values_from_crops`, bit-identical
on the CPU). One invocation measures, for each layout:

    cpu per page   process CPU time of one page in one thread, image work only (`preprocess` vs
                   `hd_crops`) and the whole row (PNG decode + `build_example`), on the same page
    bytes per row  the materialized Ray Data blocks of a few rows (`Dataset.size_bytes`) per row,
                   and the row's arrays' nbytes
    records/s      build_dataset → N actors × 1 CPU → iter_train_batches (the consumer collates),
                   for each N in --actors; "steady" counts records after the first batch over the
                   time after it (what a long epoch sees), "wall" includes actor start-up

`--sources` runs the records/s rows from more than local files (issue #12): `bucket` is the same
jsonl + images and tokenizer in an S3 bucket, `parquet` the same records as Parquet shards with the
images embedded (`datasets_ray/shards.py`) in that bucket; the bucket is an S3-compatible server
(moto, `pip install 'moto[server]'`, the test extra) started on 127.0.0.1 for the run, which
shares this machine's cores with the pipeline (a real bucket does not). Goal: bucket within 1.2×
of local files.

Pages are synthetic, generated on the fly (nothing downloaded): 1700×2200 white pages with lines
of dark "words", saved as PNG like DocVQA's scans, one question each, at num_crops 16 (a page is
[1344, 1344]: 16 crops, 2509 image tokens). `--data demo` runs the demo records instead.

`--padding` measures something else, without Ray (issue #13): the share of padded tokens in the
training micro-batches `iter_train_batches` makes from DocVQA-shaped lengths (letter pages, 2509
image tokens, and A4 pages, 1933, from the HD transform at num_crops 16, each with a synthetic
question and answer), with micro-batches in stream order, grouped by length within windows of
`--windows` rows, and packed (one row per micro-batch, or rows of at most max_length tokens).

    python bench/pipeline.py --out bench/results/pipeline_docvqa.json     # 48 pages, actors 1,2,4
    python bench/pipeline.py --padding --records 4000 --micro-batch 4 --out bench/results/padding_docvqa.json
    python bench/pipeline.py --data demo --num-crops 4 --records 200 --actors 1,2
    python bench/pipeline.py --layouts uint8 --actors 2 --sources local,bucket,parquet,local --skip-cpu
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

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from datasets_ray.demo import make_demo_dataset  # noqa: E402
from datasets_ray.pipeline import DataPaths, build_dataset  # noqa: E402
from datasets_ray.schema import iter_jsonl, write_jsonl  # noqa: E402
from phi3v_ray.collate import iter_train_batches  # noqa: E402
from phi3v_ray.config import DataConfig  # noqa: E402
from phi3v_ray.examples import build_example  # noqa: E402
from phi3v_ray.processor import Phi3VProcessor  # noqa: E402
from phi3v_ray.tiny import write_tiny_checkpoint  # noqa: E402

LAYOUTS = ("float32", "uint8")  # before, after


def document_page(seed: int, width: int = 1700, height: int = 2200) -> Image.Image:
    """A white page with ~70 lines of dark word boxes and a grey table: compresses like a scan."""
    rng = np.random.default_rng(seed)
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    y = 120
    while y < height - 140:
        x = 110
        while x < width - 200:
            w = int(rng.integers(30, 170))
            shade = int(rng.integers(0, 90))
            draw.rectangle([x, y, x + w, y + 18], fill=(shade, shade, shade + int(rng.integers(0, 30))))
            x += w + int(rng.integers(12, 24))
        y += int(rng.integers(26, 40))
        if rng.random() < 0.04:  # a table
            draw.rectangle([150, y, width - 150, y + 160], outline=(60, 60, 60), width=3, fill=(235, 235, 235))
            y += 190
    return page


def make_pages(out: Path, n: int) -> None:
    """n DocVQA-shaped records over 8 distinct pages (PNG), in the recipe's jsonl format."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(8):
        if not (images / f"page{k}.png").is_file():
            document_page(k).save(images / f"page{k}.png")
    records = [{"id": f"page-{i:05d}", "source": "docvqa-synthetic",
                "conversations": [{"images": [f"page{i % 8}.png"], "user": "What is the total on this page?",
                                   "assistant": f"{(i * 37) % 1000}.00"}]} for i in range(n)]
    write_jsonl(out / "train.jsonl", records)


def cpu_per_page(processor: Phi3VProcessor, data: DataConfig, seconds: float) -> list[dict]:
    """Process CPU ms per page, one thread: image work alone and the whole row, float32 vs uint8."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = Path(data.images_root)
    rec = next(json.loads(t) for _, t in iter_jsonl(data.train_file))
    conv = rec["conversations"]
    path = root / conv[0]["images"][0]
    page = Image.open(path).convert("RGB")
    image_processor = processor.image_processor

    def whole_row(crops: bool):
        def run():
            image = Image.open(path)
            image.load()
            build_example(processor, conv, [image.convert("RGB")], max_length=data.max_length, crops=crops)
        return run

    cases = [("image work", "float32", lambda: image_processor.preprocess([page])),
             ("image work", "uint8", lambda: image_processor.hd_crops([page])),
             ("row (decode + build_example)", "float32", whole_row(False)),
             ("row (decode + build_example)", "uint8", whole_row(True))]
    out = []
    try:
        for what, layout, fn in cases:
            fn()
            n, start = 0, time.process_time()
            while n < 3 or time.process_time() - start < seconds:
                fn()
                n += 1
            ms = 1000 * (time.process_time() - start) / n
            out.append({"case": what, "layout": layout, "cpu_ms_per_page": round(ms, 1),
                        "pages_per_cpu_s": round(1000 / ms, 1), "iterations": n})
    finally:
        torch.set_num_threads(threads)
    return out


def bytes_per_row(data: DataConfig, paths: DataPaths, rows: int) -> dict:
    """Materialized blocks' bytes per row (the object store's share) and the row arrays' nbytes."""
    ds = build_dataset(data, paths).limit(rows).materialize()
    taken = ds.take_all()
    column = "pixel_crops" if data.pixel_format == "uint8" else "pixel_values"
    arrays = [sum(np.asarray(r[k]).nbytes for k in ("input_ids", "labels", column, "image_sizes")) for r in taken]
    pixels = taken[0][column]
    result = {"layout": data.pixel_format, "rows": len(taken), "block_bytes_per_row": round(ds.size_bytes() / len(taken)),
              "array_bytes_per_row": round(sum(arrays) / len(arrays)), "pixel_column": column,
              "pixel_shape": list(pixels.shape), "pixel_dtype": str(pixels.dtype)}
    return result


PAGES = {"letter": (1700, 2200), "a4": (1240, 1754)}  # scans at 150 dpi: width × height in pixels


def page_tokens(num_crops: int = 16) -> dict[str, int]:
    """Image tokens of a letter and an A4 page after the HD transform (2509 and 1933 at num_crops 16)."""
    from phi3v_ray.processor import Phi3VImageProcessor, tokens_per_image

    processor = Phi3VImageProcessor(num_crops)
    return {name: tokens_per_image(*processor.hd_image(Image.new("RGB", size)).size[::-1])
            for name, size in PAGES.items()}


def docvqa_lengths(n: int, letter_share: float, num_crops: int = 16, seed: int = 0) -> list[int]:
    """n sample lengths: a letter or A4 page, the chat template's ~12 tokens, a question of 6–40 tokens
    and an answer of 1–24 (synthetic, shaped like DocVQA's short questions and answers)."""
    rng = np.random.default_rng(seed)
    pages = page_tokens(num_crops)
    image = np.where(rng.random(n) < letter_share, pages["letter"], pages["a4"])
    return (image + 12 + rng.integers(6, 41, n) + rng.integers(1, 25, n)).tolist()


class _Rows:
    """A list of rows behind `iter_batches`, as a worker's Ray Data shard hands them over (stream order)."""

    def __init__(self, lengths: list[int]):
        self.lengths = lengths

    def iter_batches(self, batch_size, drop_last=False, **_):
        for k in range(0, len(self.lengths), batch_size):
            chunk = self.lengths[k:k + batch_size]
            ids = np.empty(len(chunk), dtype=object)
            ids[:] = [np.full(n, 7, dtype=np.int64) for n in chunk]
            yield {"input_ids": ids, "labels": ids, "num_tokens": np.asarray(chunk, dtype=np.int64)}


def padding_rows(lengths: list[int], micro_batch: int, windows: list[int], max_length: int) -> list[dict]:
    """Padded share of the tokens in an epoch's micro-batches, per batch layout."""
    from phi3v_ray.collate import Phi3VCollate

    layouts = [("stream order, padded", 0, Phi3VCollate())]
    layouts += [(f"grouped in {w} rows, padded", w, Phi3VCollate()) for w in windows]
    layouts += [("packed, one row", 0, Phi3VCollate(packing=True)),
                (f"packed, rows ≤ {max_length}", 0, Phi3VCollate(packing=True, pack_tokens=max_length))]
    if windows:
        layouts.append((f"grouped in {windows[-1]} rows, packed rows ≤ {max_length}", windows[-1],
                        Phi3VCollate(packing=True, pack_tokens=max_length)))
    out = []
    for name, window, collate_fn in layouts:
        real = computed = batches = padded_batches = 0
        for batch in iter_train_batches(_Rows(lengths), micro_batch, epoch=0, seed=0, shuffle_buffer=None,
                                        length_window=window, collate_fn=collate_fn):
            mask = batch["attention_mask"]
            real, computed, batches = real + int(mask.sum()), computed + mask.numel(), batches + 1
            padded_batches += int(not bool(mask.all()))
        out.append({"layout": name, "window": window, "micro_batches": batches,
                    "padded_tokens_pct": round(100 * (1 - real / computed), 2),
                    "batches_with_any_padding_pct": round(100 * padded_batches / batches, 1)})
    return out


def run_ray(data: DataConfig, paths: DataPaths, micro_batch: int, actors: int) -> dict:
    t0 = time.perf_counter()
    ds = build_dataset(data, paths)
    n = n_first = 0
    t_first = None
    for batch in iter_train_batches(ds, micro_batch=micro_batch, epoch=0, seed=0, shuffle_buffer=None):
        n += batch["input_ids"].shape[0]
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
    t_end = time.perf_counter()
    steady = (n - n_first) / (t_end - t_first) if t_end > t_first and n > n_first else float("nan")
    source = "parquet" if not data.images_root else "bucket" if "://" in data.images_root else "local"
    return {"source": source, "layout": data.pixel_format, "actors": actors, "records": n, "wall_s": round(t_end - t0, 2),
            "first_batch_s": round(t_first - t0, 2), "records_per_s": round(n / (t_end - t0), 2),
            "steady_records_per_s": round(steady, 2), "load_avg_1m": round(os.getloadavg()[0], 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("docvqa", "demo"), default="docvqa", help="synthetic pages or the demo records")
    ap.add_argument("--records", type=int, default=48, help="records per pipeline run")
    ap.add_argument("--num-crops", type=int, default=16, help="HD crop budget per image, 1..16")
    ap.add_argument("--actors", default="1,2,4", help="comma-separated actor counts (1 CPU each)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="row layouts to run: float32 (before), uint8 (after)")
    ap.add_argument("--micro-batch", type=int, default=2, help="records per collated batch")
    ap.add_argument("--batch-size", type=int, default=2, help="records per map_batches call")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timed CPU seconds per cpu-per-page case")
    ap.add_argument("--workdir", default=None, help="where data and checkpoint go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the results as json here")
    ap.add_argument("--sources", default="local", help="comma-separated: local (files), bucket (jsonl + images in S3), "
                    "parquet (Parquet shards in S3); the S3 runs start a local S3 server")
    ap.add_argument("--skip-cpu", action="store_true", help="skip the cpu-per-page and bytes-per-row measurements")
    ap.add_argument("--padding", action="store_true", help="only the padded-token share of the micro-batches "
                    "(DocVQA-shaped lengths, --records of them; no Ray)")
    ap.add_argument("--windows", default="16,32,64", help="--padding: length-grouping windows (rows)")
    ap.add_argument("--letter-share", type=float, default=0.5, help="--padding: share of letter pages (rest A4)")
    args = ap.parse_args(argv)
    if args.padding:
        return padding_main(args, argv)

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    ckpt, root = work / "ckpt", work / args.data
    if not (ckpt / "tokenizer.json").is_file():
        write_tiny_checkpoint(ckpt, num_crops=args.num_crops)
    if not (root / "train.jsonl").is_file() or sum(1 for _ in iter_jsonl(root / "train.jsonl")) != args.records:
        if args.data == "docvqa":
            make_pages(root, args.records)
        else:
            make_demo_dataset(root, n_train=args.records, n_val=0, n_test=0)
    actors = [int(a) for a in args.actors.split(",")]
    layouts = [s for s in args.layouts.split(",") if s]
    paths = DataPaths(processor_dir=str(ckpt), work_dir=str(work / "manifests"))

    sources = [s for s in args.sources.split(",") if s]
    remote = _start_bucket(work, ckpt, root) if set(sources) - {"local"} else None
    inputs = {"local": (str(root / "train.jsonl"), str(root / "images"), paths)}
    if remote is not None:
        bucket_paths = DataPaths(processor_dir=remote["ckpt"], work_dir=remote["work"])
        inputs["bucket"] = (remote["train"], remote["images"], bucket_paths)
        inputs["parquet"] = (remote["parquet"], "", bucket_paths)

    def data_config(n_actors: int, layout: str, source: str = "local") -> DataConfig:
        train, images, _ = inputs[source]
        return DataConfig(
            train_file=train, images_root=images, num_crops=args.num_crops,
            preprocess_actors=n_actors, preprocess_cpus=1.0, preprocess_batch_size=args.batch_size,
            pixel_format=layout,
        )

    cpu = []
    if not args.skip_cpu:
        processor = Phi3VProcessor.from_pretrained(ckpt, num_crops=args.num_crops)
        cpu = cpu_per_page(processor, data_config(1, "uint8"), args.seconds)
        _table(cpu, ("case", "layout", "cpu_ms_per_page", "pages_per_cpu_s"))
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    for attempt in range(3):  # a local Ray can time out starting on a loaded machine
        try:
            ray.init(address="local", num_cpus=max(actors) + 1, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
            break
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for a start-up timeout
            if attempt == 2:
                raise
            print(f"ray.init failed ({e}); retrying", file=sys.stderr)
    ray.data.DataContext.get_current().enable_progress_bars = False
    sizes = [] if args.skip_cpu else [bytes_per_row(data_config(1, layout), paths, rows=4) for layout in layouts]
    runs = [run_ray(data_config(n, layout, source), inputs[source][2], args.micro_batch, n)
            for source in sources for layout in layouts for n in actors]
    ray.shutdown()
    if remote is not None:
        remote["server"].__exit__(None, None, None)

    cores = os.cpu_count()
    print(f"\n{args.records} {args.data} records, num_crops {args.num_crops}, micro batch {args.micro_batch}, "
          f"{cores} cores ({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}")
    if cpu:
        _table(cpu, ("case", "layout", "cpu_ms_per_page", "pages_per_cpu_s"))
        _table(sizes, ("layout", "block_bytes_per_row", "array_bytes_per_row", "pixel_shape", "pixel_dtype"))
    _table(runs, ("source", "layout", "actors", "records", "wall_s", "first_batch_s", "records_per_s", "steady_records_per_s",
                  "load_avg_1m"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"data": args.data, "records": args.records, "num_crops": args.num_crops,
                   "micro_batch": args.micro_batch, "cores": cores, "cpu_per_page": cpu, "bytes_per_row": sizes,
                   "pipeline": runs, "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


def padding_main(args, argv) -> None:
    lengths = docvqa_lengths(args.records, args.letter_share, args.num_crops)
    windows = [int(w) for w in args.windows.split(",") if w]
    max_length = DataConfig().max_length
    rows = padding_rows(lengths, args.micro_batch, windows, max_length)
    pages = page_tokens(args.num_crops)
    print(f"\n{args.records} DocVQA-shaped samples ({args.letter_share:.0%} letter pages of {pages['letter']} image "
          f"tokens, the rest A4 of {pages['a4']}; {min(lengths)}–{max(lengths)} tokens), micro batch {args.micro_batch}")
    _table(rows, ("layout", "micro_batches", "padded_tokens_pct", "batches_with_any_padding_pct"))
    if args.out:
        payload = {"what": "padded share of the tokens in training micro-batches", "records": args.records,
                   "micro_batch": args.micro_batch, "num_crops": args.num_crops, "letter_share": args.letter_share,
                   "page_image_tokens": pages, "sample_tokens": {"min": min(lengths), "max": max(lengths),
                                                                "mean": round(float(np.mean(lengths)), 1)},
                   "max_length": max_length, "layouts": rows,
                   "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


def _start_bucket(work: Path, ckpt: Path, root: Path) -> dict:
    """A local S3 server holding the checkpoint, the jsonl + images and the Parquet shards (AWS_* set for Ray)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from s3_server import s3_server

    from datasets_ray.shards import convert_to_shards
    from phi3v_ray.storage import upload_dir

    server = s3_server()
    s3 = server.__enter__()
    s3.client.create_bucket(Bucket="bench")
    t0 = time.perf_counter()
    upload_dir(ckpt, "s3://bench/ckpt")
    upload_dir(root, "s3://bench/data")
    convert_to_shards(root, ["train"], "s3://bench/parquet")
    print(f"bucket: uploaded in {time.perf_counter() - t0:.1f} s to {s3.endpoint}", flush=True)
    return {"server": server, "ckpt": "s3://bench/ckpt", "train": "s3://bench/data/train.jsonl",
            "images": "s3://bench/data/images", "parquet": "s3://bench/parquet/train", "work": "s3://bench/manifests"}


def _table(rows: list[dict], cols: tuple[str, ...]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("\n" + "  ".join(f"{c:>{w}}" for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(f"{r[c]!s:>{w}}" for c, w in zip(cols, widths)))


if __name__ == "__main__":
    main()
