"""Built-in demo data: small procedural images in the record format, the same for the same seed.

Four task shapes, one per record in turn, each with a short answer a tiny randomly initialised
model can learn on CPU in minutes:

    colour       1 image    "What colour is the shape?"                          red|green|blue|yellow
    same_colour  2 images   "Do both images show the same colour? Answer yes or no."       yes|no
    motion       8 frames   "Which way does the square move? Answer left or right."     left|right
    digit        1 image    "What digit is written?"  (DocVQA-like, with `answers`)        1|4|7|8

Writes out_dir/images/{split}/... and out_dir/{train,val,test}.jsonl; every record also has
`task` and `source: "demo"`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from phi3v_ray.constants import image_tag

from .schema import write_jsonl

TASKS = ("colour", "same_colour", "motion", "digit")
COLOURS = {"red": (215, 45, 45), "green": (40, 165, 70), "blue": (45, 85, 215), "yellow": (230, 200, 35)}
DIGITS = ("1", "4", "7", "8")  # four shapes unlike each other, so a tiny model can tell them apart
BACKGROUND = (235, 235, 235)
SIZE = 96  # still images are SIZE x SIZE; video frames are SIZE x 64
FRAME_H = 64
N_FRAMES = 8


def _jitter(rgb, rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _shape_image(colour: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    side = rng.randint(44, 68)
    x, y = rng.randint(4, SIZE - side - 4), rng.randint(4, SIZE - side - 4)
    fill = _jitter(COLOURS[colour], rng)
    kind = rng.choice(("circle", "square", "triangle"))
    if kind == "circle":
        draw.ellipse((x, y, x + side, y + side), fill=fill)
    elif kind == "square":
        draw.rectangle((x, y, x + side, y + side), fill=fill)
    else:
        draw.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return img


def _motion_frames(direction: str, rng: random.Random) -> list[Image.Image]:
    side, step = 16, 8
    travel = step * (N_FRAMES - 1)
    start = rng.randint(0, SIZE - side - travel)
    if direction == "left":
        start, step = start + travel, -step
    y = rng.randint(4, FRAME_H - side - 4)
    fill = _jitter(COLOURS[rng.choice(list(COLOURS))], rng)
    frames = []
    for k in range(N_FRAMES):
        img = Image.new("RGB", (SIZE, FRAME_H), BACKGROUND)
        x = start + k * step
        ImageDraw.Draw(img).rectangle((x, y, x + side - 1, y + side - 1), fill=fill)
        frames.append(img)
    return frames


@lru_cache(maxsize=None)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: caller scales the bitmap font up
        return None


def _digit_image(digit: str, rng: random.Random) -> Image.Image:
    font = _font(64)
    if font is None:
        small = Image.new("RGB", (16, 16), "white")
        ImageDraw.Draw(small).text((4, 2), digit, fill="black")
        return small.resize((SIZE, SIZE), Image.NEAREST)
    img = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), digit, font=font)
    x = (SIZE - (right - left)) // 2 - left + rng.randint(-10, 10)
    y = (SIZE - (bottom - top)) // 2 - top + rng.randint(-10, 10)
    draw.text((x, y), digit, fill=_jitter((20, 20, 20), rng, 20), font=font)
    return img


def _record(task: str, j: int, rid: str, split: str, rng: random.Random, images_dir: Path) -> dict:
    """Draw the j-th example of `task`, save its images, and return its record.

    Answers cycle with j so every split is class-balanced; the rest of the drawing is random.
    """
    extra = {}
    if task == "colour":
        answer = list(COLOURS)[j % len(COLOURS)]
        images = [_shape_image(answer, rng)]
        question = "What colour is the shape?"
    elif task == "same_colour":
        palette = ["red", "green", "blue"]
        first = rng.choice(palette)
        same = j % 2 == 0
        second = first if same else rng.choice([c for c in palette if c != first])
        images = [_shape_image(first, rng), _shape_image(second, rng)]
        question, answer = "Do both images show the same colour? Answer yes or no.", "yes" if same else "no"
    elif task == "motion":
        answer = ("left", "right")[j % 2]
        images = _motion_frames(answer, rng)
        question = "Which way does the square move? Answer left or right."
    elif task == "digit":
        answer = DIGITS[j % len(DIGITS)]
        images = [_digit_image(answer, rng)]
        question = "What digit is written?"
        extra = {"answers": [answer]}
    else:
        raise ValueError(f"unknown demo task {task!r}; choose from {TASKS}")

    rels = []
    for k, img in enumerate(images):
        rel = f"{split}/{rid}.{k}.png"
        img.save(images_dir / rel, format="PNG")
        rels.append(rel)
    tags = "".join(image_tag(k) for k in range(1, len(rels) + 1))
    return {
        "id": rid,
        "source": "demo",
        "task": task,
        "conversations": [{"images": rels, "user": f"{tags}\n{question}", "assistant": answer}],
        **extra,
    }


def make_demo_dataset(
    out_dir,
    n_train: int = 240,
    n_val: int = 48,
    n_test: int = 48,
    seed: int = 0,
    tasks: Sequence[str] = TASKS,
) -> dict[str, int]:
    """Write the demo dataset to out_dir; returns {split: n_records}. Same seed, same bytes."""
    out_dir = Path(out_dir)
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("tasks must name at least one of " + ", ".join(TASKS))
    counts = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rng = random.Random(f"phi3v-ray-demo:{seed}:{split}")
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        records = [
            _record(tasks[i % len(tasks)], i // len(tasks), f"demo-{split}-{i:05d}", split, rng, out_dir / "images")
            for i in range(n)
        ]
        counts[split] = write_jsonl(out_dir / f"{split}.jsonl", records)
    return counts
