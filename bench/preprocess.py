"""Preprocessing throughput on one CPU core: HD crops per second and full examples per second.

Ray Data runs preprocessing in 1-CPU actors, so the number that sizes a pipeline is what one core
does. The script pins torch to one thread; for a faithful number also pin the native libraries
before Python starts, since OpenMP/MKL read their thread counts at import:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 0 python bench/preprocess.py --out bench/results/preprocess.json

Cases (synthetic images, so no data is needed):
- page:  a 1700×2200 document page at num_crops 16 → [1344, 1344], 17 crop slots, 2509 tokens
- frame: a 320×240 video frame at num_crops 4 → [672, 672], 5 crop slots, 757 tokens
- example: `build_example` on a one-turn DocVQA-shaped record (the page above, question, answer)
  with the tiny checkpoint's tokenizer: image processing + per-chunk tokenization + label masking
- tokenize: the same example's text side only (tags, chat template, answers), no image work
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

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3v_ray.examples import build_example, chat_prompt  # noqa: E402
from phi3v_ray.processor import Phi3VImageProcessor, Phi3VProcessor  # noqa: E402

QUESTION = "What is the number written in the text of the page? Answer with the digit."
ANSWER = "7"


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise (so no resampling shortcut applies) decoded once, outside the timed loop."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def rate(fn, min_seconds: float, min_iters: int = 3) -> tuple[float, int]:
    """Calls per second of fn() over at least min_seconds and min_iters calls (after one warm-up)."""
    fn()
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < min_seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start), n


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="checkpoint dir for the tokenizer (default: write a tiny one to a temp dir)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per case")
    parser.add_argument("--out", help="write the results as json here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    env_threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if env_threads["OMP_NUM_THREADS"] != "1":
        print("note: OMP_NUM_THREADS is not 1; native libraries may still use several threads", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        if args.ckpt:
            ckpt = Path(args.ckpt)
        else:
            from phi3v_ray.tiny import write_tiny_checkpoint

            ckpt = write_tiny_checkpoint(Path(tmp) / "tiny", num_crops=16)
        processor = Phi3VProcessor.from_pretrained(ckpt, num_crops=16)

    page, frame = synthetic_image(1700, 2200, seed=0), synthetic_image(320, 240, seed=1)
    page_proc, frame_proc = Phi3VImageProcessor(16), Phi3VImageProcessor(4)
    record = [{"images": ["page.png"], "user": QUESTION, "assistant": ANSWER}]
    tokens_by_tag = {1: page_proc.preprocess([page])["num_img_tokens"][0]}

    def tokenize_only():
        prompt = processor.tokenize_prompt(chat_prompt(f"<|image_1|>\n{QUESTION}"), tokens_by_tag)
        answer = processor.encode_text(f"{ANSWER}<|end|>\n<|endoftext|>", add_special_tokens=False)
        return prompt + answer

    cases = [
        ("page 1700x2200 @16 (preprocess)", "images/s", lambda: page_proc.preprocess([page])),
        ("frame 320x240 @4 (preprocess)", "images/s", lambda: frame_proc.preprocess([frame])),
        ("page example (build_example)", "examples/s", lambda: build_example(processor, record, [page])),
        ("text only (tokenize)", "examples/s", tokenize_only),
    ]
    results = []
    for name, unit, fn in cases:
        per_s, n = rate(fn, args.seconds)
        results.append({"case": name, "unit": unit, "per_s": per_s, "ms_each": 1000.0 / per_s, "iterations": n})

    width = max(len(r["case"]) for r in results)
    print(f"{'case':<{width}}  {'rate':>12}  {'unit':<10}  {'ms each':>8}")
    for r in results:
        print(f"{r['case']:<{width}}  {r['per_s']:>12.2f}  {r['unit']:<10}  {r['ms_each']:>8.2f}")

    report = {
        "results": results,
        "torch_threads": torch.get_num_threads(),
        "env": env_threads,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": Image.__version__,
        "tokenizer": str(ckpt) if args.ckpt else "tiny (written to a temp dir)",
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
