"""Hateful Memes (official Facebook release) -> yes/no classification records.

Raw layout under `src`:

    train.jsonl, dev_seen.jsonl, test_seen.jsonl    {"id", "img": "img/01235.png", "label": 0|1, "text"}
    img/01235.png

The question is the recipe's, without the meme text (the text is part of the image):
"<|image_1|>\\nIs this meme hateful? Answer yes or no." -> "yes" / "no".
"""

from __future__ import annotations

from pathlib import Path

from ..schema import write_jsonl
from ._common import ConversionError, as_mapping, link_or_copy, read_raw_jsonl, require_file, safe_rel

QUESTION = "Is this meme hateful? Answer yes or no."
DEFAULT_SPLITS = {"train": "train", "val": "dev_seen", "test": "test_seen"}


def convert_hateful_memes(src: Path, out: Path, *, splits=None) -> dict[str, int]:
    """Convert Hateful Memes; `splits` maps output split -> raw file stem."""
    src, out = Path(src), Path(out)
    mapping = as_mapping(splits, "splits") if splits else dict(DEFAULT_SPLITS)
    counts = {}
    for split, raw in mapping.items():
        path = require_file(src / f"{raw}.jsonl", f"Hateful Memes split file for {split!r}")
        records = []
        for where, item in read_raw_jsonl(path, ("id", "img", "label")):
            if item["label"] not in (0, 1):
                raise ConversionError(f"{where}: label must be 0 or 1, got {item['label']!r}")
            rel = safe_rel(item["img"], where)
            image = require_file(src / rel, f"image {rel!r} named at {where}")
            link_or_copy(image, out / "images" / rel)
            records.append({
                "id": str(item["id"]),
                "source": "hateful_memes",
                "conversations": [{
                    "images": [rel],
                    "user": "<|image_1|>\n" + QUESTION,
                    "assistant": "yes" if item["label"] == 1 else "no",
                }],
            })
        counts[split] = write_jsonl(out / f"{split}.jsonl", records)
    return counts
