"""Micro-batch layouts side by side: the same mixed micro-batches, padded or packed, forward + backward.

The demo's tasks differ in length (one image: ~330 tokens; four video frames: ~1280; the 8-frame
demo before 2026-11-30: 2537), and a shuffled stream mixes them, so a padded micro-batch of 4 with one
video record computes four.
Three layouts of the same examples, timed on the tiny model in training mode (loss_only, as the
engine calls it), torch at 1 thread as a 1-CPU Ray worker gets:

    padded          right-padded, no mask (SDPA's causal kernel over B × the longest length)
    packed, mask    one row, plain sdpa: a dense block-diagonal causal mask (the fallback)
    packed, segments one row, `segment_sdpa`: SDPA's causal kernel once per example (what a
                    packed training run under sdpa uses; packing=auto turns it on)

Each layout runs the micro-batches once to warm up, then `--repeats` times; the best pass counts.

    python bench/packing.py                                   # 8 micro-batches of 4, prints the table
    python bench/packing.py --out bench/results/packing_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def demo_examples(workdir: Path, n: int, seed: int) -> tuple[Path, list[dict]]:
    """A tiny checkpoint and `n` demo training examples in a shuffled stream order, as pipeline rows."""
    from PIL import Image

    from datasets_ray.demo import make_demo_dataset
    from phi3v_ray.examples import build_example
    from phi3v_ray.processor import Phi3VProcessor
    from phi3v_ray.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(workdir / "tiny", num_crops=1)
    data = workdir / "data"
    make_demo_dataset(data, n_train=max(n, 8), n_val=4, n_test=4)
    processor = Phi3VProcessor.from_pretrained(ckpt, num_crops=1)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    random.Random(seed).shuffle(records)
    rows = []
    for record in records[:n]:
        turn = record["conversations"][0]
        images = [Image.open(data / "images" / p).convert("RGB") for p in turn["images"]]
        ex = build_example(processor, record["conversations"], images, crops=True)
        rows.append({"input_ids": ex.input_ids, "labels": ex.labels, "pixel_crops": ex.pixel_crops,
                     "image_sizes": ex.image_sizes})
    return ckpt, rows


def time_layout(model, batches: list[dict], repeats: int) -> float:
    import torch

    from phi3v_ray.collate import to_device

    def one_pass() -> float:
        t = time.perf_counter()
        for batch in batches:
            inputs = to_device(batch, torch.device("cpu"), training=True)
            model(**inputs, loss_only=True, num_items_in_batch=10).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    one_pass()
    return min(one_pass() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the stream order of the records")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from phi3v_ray.collate import collate
    from phi3v_ray.model import Phi3VForCausalLM
    from phi3v_ray.model.packed import use_segment_sdpa
    from phi3v_ray.packing import pack

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-packing-") as tmp:
        ckpt, rows = demo_examples(Path(tmp), args.micro_batches * args.micro_batch, args.seed)
        groups = [rows[i:i + args.micro_batch] for i in range(0, len(rows), args.micro_batch)]
        model = Phi3VForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", local_files_only=True).train()
        padded = [collate(g) for g in groups]
        packed = [pack(g) for g in groups]
        seconds = {"padded": time_layout(model, padded, args.repeats),
                   "packed, mask": time_layout(model, packed, args.repeats)}
        use_segment_sdpa(model)
        seconds["packed, segments"] = time_layout(model, packed, args.repeats)

    real = sum(len(r["input_ids"]) for r in rows)
    computed = {"padded": sum(b["input_ids"].numel() for b in padded), "packed, mask": real, "packed, segments": real}
    frames = max(len(r["image_sizes"]) for r in rows)
    long_ones = [sum(len(r["image_sizes"]) == frames for r in g) for g in groups]
    print(f"{len(groups)} micro-batches of {args.micro_batch} demo examples ({frames}-frame records per micro-batch: "
          f"{long_ones}), forward + backward, 1 thread")
    print(f"{'layout':<18} {'seconds':>8} {'vs padded':>10} {'tokens computed':>16}")
    for name, s in seconds.items():
        print(f"{name:<18} {s:>8.2f} {seconds['padded'] / s:>9.2f}x {computed[name]:>16,}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python bench/packing.py " + " ".join(sys.argv[1:]),
            "micro_batches": len(groups), "micro_batch": args.micro_batch, "video_records": long_ones, "video_frames": frames,
            "seconds": seconds, "tokens_computed": computed, "real_tokens": real,
            "speedup_vs_padded": {k: seconds["padded"] / v for k, v in seconds.items()},
            "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
