"""Hateful Memes (official Facebook release) -> yes/no classification records.

Raw layout: a folder `data/` holding the split files and `img/`; `src` is that folder or its parent.
Lines are {"id", "img": "img/01235.png", "label": 0|1, "text"}. Two releases exist, told apart by
their file names:

    phase 2 (and the final release):  train, dev_seen, test_seen (+ dev_unseen, test_unseen).jsonl
        default splits  train:train, val:dev_seen, test:test_seen
    phase 1:                           train, dev, test.jsonl
        default splits  train:train, val:dev, test:test

A test file without labels (phase 1's test.jsonl was released unlabelled) is written as
`{split}_noanswer.jsonl` (assistant "", for prediction only), as docvqa does with its test split.
Train and val files must be labelled.

The question is the recipe's, without the meme text (the text is part of the image):
"<|image_1|>\\nIs this meme hateful? Answer yes or no." -> "yes" / "no".
"""

from __future__ import annotations

from pathlib import Path

from ._common import (
    ConversionError, as_mapping, link_or_copy, read_raw_jsonl, require_file, safe_rel, write_splits,
)

QUESTION = "Is this meme hateful? Answer yes or no."
PHASE2_SPLITS = {"train": "train", "val": "dev_seen", "test": "test_seen"}
PHASE1_SPLITS = {"train": "train", "val": "dev", "test": "test"}
DEFAULT_SPLITS = PHASE2_SPLITS
LABELLED_SPLITS = ("train", "val")  # output splits that are trained or scored on: labels required


def _data_dir(src: Path) -> Path:
    """The folder holding the split files: `src` itself, or `src/data` (the unpacked release)."""
    for d in (src, src / "data"):
        if any(d.glob("*.jsonl")):
            return d
    return src


def _default_splits(data: Path) -> dict[str, str]:
    """Phase 2 when dev_seen.jsonl is there, phase 1 when only dev.jsonl is; says which."""
    if not (data / "dev_seen.jsonl").is_file() and (data / "dev.jsonl").is_file():
        print(f"hateful_memes: {data}: phase-1 release (train/dev/test.jsonl)")
        return dict(PHASE1_SPLITS)
    if (data / "dev_seen.jsonl").is_file():
        print(f"hateful_memes: {data}: phase-2 release (train/dev_seen/test_seen.jsonl)")
    return dict(PHASE2_SPLITS)


def _read(path: Path, split: str) -> tuple[list[tuple[str, dict]], bool]:
    """(where, item) pairs of one split file and whether it is labelled; a mix of both raises."""
    items = list(read_raw_jsonl(path, ("id", "img")))
    unlabelled = [where for where, item in items if "label" not in item]
    if not unlabelled:
        return items, True
    if len(unlabelled) == len(items) and split not in LABELLED_SPLITS:
        return items, False
    if split in LABELLED_SPLITS:
        why = f"split {split!r} is trained or scored on, so every line needs a label"
    else:
        why = "other lines of this file have labels"
    raise ConversionError(f"{unlabelled[0]}: missing field 'label' ({why})")


def convert_hateful_memes(src: Path, out: Path, *, splits=None) -> dict[str, int]:
    """Convert Hateful Memes; `splits` maps output split -> raw file stem (default: by release)."""
    src, out = Path(src), Path(out)
    data = _data_dir(src)
    mapping = as_mapping(splits, "splits") if splits else _default_splits(data)
    jobs = {}
    for split, raw in mapping.items():
        path = require_file(data / f"{raw}.jsonl", f"Hateful Memes split file for {split!r}")
        items, labelled = _read(path, split)
        if labelled:
            jobs[split] = (items, True)
        else:
            print(f"hateful_memes: {path.name} has no labels (phase 1's test set was released unlabelled); "
                  f"writing {split}_noanswer.jsonl for prediction only")
            jobs[f"{split}_noanswer"] = (items, False)
    return write_splits(out, {
        split: _records(items, labelled, data, out) for split, (items, labelled) in jobs.items()
    })


def _records(items: list[tuple[str, dict]], labelled: bool, data: Path, out: Path):
    """Yield one split's records, placing each meme under out/images/img/."""
    for where, item in items:
        if labelled and item["label"] not in (0, 1):
            raise ConversionError(f"{where}: label must be 0 or 1, got {item['label']!r}")
        rel = safe_rel(item["img"], where)
        image = require_file(data / rel, f"image {rel!r} named at {where}")
        link_or_copy(image, out / "images" / rel)
        yield {
            "id": str(item["id"]),
            "source": "hateful_memes",
            "conversations": [{
                "images": [rel],
                "user": "<|image_1|>\n" + QUESTION,
                "assistant": ("yes" if item["label"] == 1 else "no") if labelled else "",
            }],
        }
