"""NLVR2 (official release) -> two-image yes/no records.

Raw layout under `src`:

    train.json, dev.json, test1.json (or data/*.json)   one JSON object per line:
        {"identifier": "train-10171-0-0", "sentence", "label": "True"|"False", "directory": 65, ...}
    images_dir (default src/images, else src):
        train/{directory}/train-10171-0-img0.png, ...-img1.png
        dev/dev-850-0-img0.png          test1/test1-123-1-img0.png

An identifier's image pair is named by the identifier minus its last "-N" part plus -img0/-img1.
Record: "<|image_1|><|image_2|>\\n{sentence} Answer yes or no." -> "yes" / "no".
"""

from __future__ import annotations

from pathlib import Path

from ..schema import write_jsonl
from ._common import ConversionError, as_mapping, link_or_copy, read_raw_jsonl

DEFAULT_SPLITS = {"train": "train", "val": "dev", "test": "test1"}
LABELS = {"true": "yes", "false": "no"}


def _find_json(src: Path, raw: str) -> Path:
    for cand in (src / f"{raw}.json", src / "data" / f"{raw}.json"):
        if cand.is_file():
            return cand
    raise ConversionError(f"{src}: NLVR2 split file {raw}.json not found (looked in . and data/)")


def _image_pair(item: dict, raw: str, images_dir: Path) -> list[Path] | None:
    stem = item["identifier"].rsplit("-", 1)[0]
    folders = [images_dir / raw]
    if "directory" in item:
        folders.insert(0, images_dir / raw / str(item["directory"]))
    for folder in folders:
        pair = [folder / f"{stem}-img{i}.png" for i in (0, 1)]
        if all(p.is_file() for p in pair):
            return pair
    return None


def convert_nlvr2(
    src: Path, out: Path, *, images_dir=None, splits=None, skip_missing_images: bool = False
) -> dict[str, int]:
    """Convert NLVR2; missing images raise unless skip_missing_images (then counted and printed)."""
    src, out = Path(src), Path(out)
    if images_dir:
        images_dir = Path(images_dir)
    else:
        images_dir = src / "images" if (src / "images").is_dir() else src
    mapping = as_mapping(splits, "splits") if splits else dict(DEFAULT_SPLITS)
    counts = {}
    for split, raw in mapping.items():
        path = _find_json(src, raw)
        records, missing = [], 0
        for where, item in read_raw_jsonl(path, ("identifier", "sentence", "label")):
            answer = LABELS.get(str(item["label"]).lower())
            if answer is None:
                raise ConversionError(f"{where}: label must be True or False, got {item['label']!r}")
            pair = _image_pair(item, raw, images_dir)
            if pair is None:
                if skip_missing_images:
                    missing += 1
                    continue
                raise ConversionError(
                    f"{where}: images for {item['identifier']} not found under {images_dir / raw}"
                )
            rels = [f"{raw}/{p.name}" for p in pair]
            for p, rel in zip(pair, rels):
                link_or_copy(p, out / "images" / rel)
            records.append({
                "id": item["identifier"],
                "source": "nlvr2",
                "conversations": [{
                    "images": rels,
                    "user": f"<|image_1|><|image_2|>\n{item['sentence']} Answer yes or no.",
                    "assistant": answer,
                }],
            })
        if missing:
            print(f"nlvr2: {split}: skipped {missing} example(s) whose images are missing")
        counts[split] = write_jsonl(out / f"{split}.jsonl", records)
    return counts
