"""The built-in demo dataset: valid records, the same bytes for the same seed, balanced answers."""

from collections import Counter

import pytest
from PIL import Image

from datasets_ray.demo import BACKGROUND, COLOURS, DIGITS, TASKS, make_demo_dataset
from datasets_ray.schema import validate_file

SMALL = dict(n_train=24, n_val=8, n_test=8)


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_all_records_validate(tmp_path):
    counts = make_demo_dataset(tmp_path, **SMALL)
    assert counts == {"train": 24, "val": 8, "test": 8}
    for split, n in counts.items():
        good, n_bad = validate_file(tmp_path / f"{split}.jsonl", tmp_path / "images")
        assert (len(good), n_bad) == (n, 0)
        assert all(r["source"] == "demo" and r["task"] in TASKS for r in good)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    make_demo_dataset(tmp_path / "a", **SMALL, seed=3)
    make_demo_dataset(tmp_path / "b", **SMALL, seed=3)
    make_demo_dataset(tmp_path / "c", **SMALL, seed=4)
    a, b, c = snapshot(tmp_path / "a"), snapshot(tmp_path / "b"), snapshot(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_task_shapes(tmp_path):
    make_demo_dataset(tmp_path, n_train=48, n_val=0, n_test=0)
    good, _ = validate_file(tmp_path / "train.jsonl", tmp_path / "images")
    by_task = {t: [r for r in good if r["task"] == t] for t in TASKS}
    expected = {
        "colour": (1, "What colour is the shape?", set(COLOURS)),
        "bigger": (2, "Is the second shape bigger than the first? Answer yes or no.", {"yes", "no"}),
        "fade": (4, "Does the video fade in or fade out? Answer in or out.", {"in", "out"}),
        "digit": (1, "What digit is written?", set(DIGITS)),
    }
    for task, (n_images, question, answers) in expected.items():
        records = by_task[task]
        assert len(records) == 12
        counts = Counter(r["conversations"][0]["assistant"] for r in records)
        assert set(counts) == answers and len(set(counts.values())) == 1  # balanced
        for r in records:
            turn = r["conversations"][0]
            assert len(turn["images"]) == n_images
            assert turn["user"].endswith("\n" + question)
            assert turn["user"].startswith("".join(f"<|image_{k}|>" for k in range(1, n_images + 1)))
        if task == "digit":
            assert all(r["answers"] == [r["conversations"][0]["assistant"]] for r in records)


def _shape_area(image) -> int:
    return sum(p != BACKGROUND for p in image.getdata())


def test_images_show_the_answer(tmp_path):
    make_demo_dataset(tmp_path, n_train=16, n_val=0, n_test=0)
    good, _ = validate_file(tmp_path / "train.jsonl", tmp_path / "images")
    for r in good:
        turn = r["conversations"][0]
        frames = [Image.open(tmp_path / "images" / p).convert("RGB") for p in turn["images"]]
        assert all(f.width <= 160 and f.height <= 120 for f in frames)
        if r["task"] == "colour":
            # the most common non-background pixel is nearest to the answer's colour
            pixels = [p for p in frames[0].getdata() if p != (235, 235, 235)]
            top = Counter(pixels).most_common(1)[0][0]
            nearest = min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], top)))
            assert nearest == turn["assistant"]
        elif r["task"] == "bigger":
            first, second = map(_shape_area, frames)
            assert (second > 2 * first) == (turn["assistant"] == "yes")
            assert (first > 2 * second) == (turn["assistant"] == "no")
        elif r["task"] == "fade":
            brightness = [sum(map(sum, f.getdata())) for f in frames]
            assert brightness == sorted(brightness, reverse=turn["assistant"] == "out")
            assert max(brightness) > 3 * min(brightness)
        else:  # digit: printed at the centre of the page, so the ink's centre is the page's
            ink = [(x, y) for y in range(frames[0].height) for x in range(frames[0].width)
                   if sum(frames[0].getpixel((x, y))) < 300]
            cx, cy = (sum(c) / len(ink) for c in zip(*ink))
            assert abs(cx - frames[0].width / 2) < 12 and abs(cy - frames[0].height / 2) < 12


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="unknown demo task"):
        make_demo_dataset(tmp_path, n_train=1, n_val=0, n_test=0, tasks=["nope"])
