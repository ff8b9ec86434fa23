"""Built-in demo data: small procedural images in the record format, the same for the same seed.

Four task shapes, one per record in turn, the recipe's four in miniature, each with a short answer
a tiny randomly initialised model learns on CPU in a few minutes:

    colour  1 image   "What colour is the shape?"                                  red|green|blue|yellow
    bigger  2 images  "Is the second shape bigger than the first? Answer yes or no."      yes|no  (NLVR2-like)
    fade    4 frames  "Does the video fade in or fade out? Answer in or out."              in|out  (UCF-101-like)
    digit   1 image   "What digit is written?"  (DocVQA-like, with `answers`)             1|4|7|8

Each task asks for something a 4 M-parameter model can see: a colour, an area, the brightness of a
whole frame over time, a digit printed at the centre of its page. (Where a small square sits in a
frame, or a digit drawn anywhere, it does not learn in that budget: see the README.)

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

TASKS = ("colour", "bigger", "fade", "digit")
COLOURS = {"red": (215, 45, 45), "green": (40, 165, 70), "blue": (45, 85, 215), "yellow": (230, 200, 35)}
DIGITS = ("1", "4", "7", "8")  # four shapes unlike each other, so a tiny model can tell them apart
BACKGROUND = (235, 235, 235)
SIZE = 96  # still images are SIZE x SIZE; video frames are SIZE x 64
FRAME_H = 64
FADE = (0.15, 0.4, 0.7, 1.0)  # frame brightness of a fade-in; a fade-out plays it backwards
N_FRAMES = len(FADE)
SMALL_SIDE, BIG_SIDE = (16, 32), (56, 80)  # the two shapes of a `bigger` record


def _jitter(rgb, rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _shape_image(colour: str, rng: random.Random, side_range: tuple[int, int] = (44, 68)) -> Image.Image:
    """A circle, square or triangle of `colour` (slightly jittered) at a random place."""
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    side = rng.randint(*side_range)
    x, y = rng.randint(2, SIZE - side - 2), rng.randint(2, SIZE - side - 2)
    fill = _jitter(COLOURS[colour], rng)
    kind = rng.choice(("circle", "square", "triangle"))
    if kind == "circle":
        draw.ellipse((x, y, x + side, y + side), fill=fill)
    elif kind == "square":
        draw.rectangle((x, y, x + side, y + side), fill=fill)
    else:
        draw.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return img


def _fade_frames(direction: str, rng: random.Random) -> list[Image.Image]:
    """N_FRAMES of a plain grey field whose brightness rises ("in") or falls ("out")."""
    peak = rng.randint(200, 255)
    levels = FADE if direction == "in" else FADE[::-1]
    return [Image.new("RGB", (SIZE, FRAME_H), (round(peak * f),) * 3) for f in levels]


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
    x = (SIZE - (right - left)) // 2 - left  # centred: where a digit sits, the tiny model does not learn
    y = (SIZE - (bottom - top)) // 2 - top
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
    elif task == "bigger":
        colour = rng.choice(list(COLOURS))
        bigger = j % 2 == 0
        sides = (SMALL_SIDE, BIG_SIDE) if bigger else (BIG_SIDE, SMALL_SIDE)
        images = [_shape_image(colour, rng, side_range=r) for r in sides]
        question, answer = "Is the second shape bigger than the first? Answer yes or no.", "yes" if bigger else "no"
    elif task == "fade":
        answer = ("in", "out")[j % 2]
        images = _fade_frames(answer, rng)
        question = "Does the video fade in or fade out? Answer in or out."
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
