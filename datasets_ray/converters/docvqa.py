"""DocVQA single-page (Task 1, official RRC download) -> document question answering records.

Raw layout under `src` (searched recursively for the json files):

    train_v1.0.json | train_v1.0_withQT.json     {"data": [{"questionId", "question",
    val_v1.0.json   | val_v1.0_withQT.json                  "image": "documents/xxx.png",
    test_v1.0.json                                          "answers": [...], "docId", ...}]}

The images are found in either of the two official download layouts, or in `images_dir`:

    {train,val,test}/documents/xxx.png     the per-split tarballs: images relative to the json file
    spdocvqa_qas/*.json                    the RRC "Single Page DocVQA" downloads: the json files in
    spdocvqa_images/xxx.png                one folder, every image flat in a folder beside it (any
                                           sibling folder whose name contains "images" is tried)

Every reference answer is kept in the record's `answers` field for ANLS; `assistant` is the first.
The official test split has no answers: by default it is skipped with a printed note; with
`include_test=True` it is written to `test_noanswer.jsonl` (assistant "" and answers []), a file
for prediction only that validate_record rejects on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

from ._common import ConversionError, link_or_copy, write_splits

SPLITS = {"train": "train", "val": "val"}  # output split -> raw split name


def _find_json(src: Path, raw: str) -> Path | None:
    for name in (f"{raw}_v1.0_withQT.json", f"{raw}_v1.0.json"):
        hits = sorted(src.rglob(name))
        if hits:
            return hits[0]
    return None


def _beside(json_path: Path) -> list[Path]:
    """Folders beside the json file's folder that may hold the images (spdocvqa_images/)."""
    try:
        siblings = sorted(json_path.parent.parent.iterdir())
    except OSError:
        return []
    return [d for d in siblings if d != json_path.parent and "images" in d.name.lower() and d.is_dir()]


def _resolve_image(image: str, json_path: Path, src: Path, images_dirs: list[Path], given: bool) -> Path | None:
    """The file of `image` ("documents/x.png"): in a given images_dir first, else next to the json."""
    near = [json_path.parent / image, src / image]
    other = [c for d in images_dirs for c in (d / image, d / Path(image).name)]
    candidates = other + near if given else near + other
    return next((c for c in candidates if c.is_file()), None)


def _load(json_path: Path) -> list[dict]:
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{json_path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ConversionError(f"{json_path}: expected a top-level object with a 'data' list")
    return data["data"]


def convert_docvqa(
    src: Path, out: Path, *, images_dir=None, include_test: bool = False
) -> dict[str, int]:
    """Convert DocVQA Task 1 to train/val jsonl (+ test_noanswer.jsonl if include_test)."""
    src, out = Path(src), Path(out)
    images_dir = Path(images_dir) if images_dir else None
    if not src.is_dir():
        raise ConversionError(f"{src}: DocVQA folder not found")
    wanted = dict(SPLITS)
    test_json = _find_json(src, "test")
    if test_json is not None:
        if include_test:
            wanted["test_noanswer"] = "test"
        else:
            print(f"docvqa: skipping {test_json.name} (no answers); pass include_test=true to write "
                  "test_noanswer.jsonl for prediction")

    json_paths = {}
    for split, raw in wanted.items():
        json_paths[split] = _find_json(src, raw)
        if json_paths[split] is None:
            raise ConversionError(f"{src}: no {raw}_v1.0.json or {raw}_v1.0_withQT.json found")
    return write_splits(out, {
        split: _records(json_paths[split], split, raw, src, out, images_dir) for split, raw in wanted.items()
    })


def _records(json_path: Path, split: str, raw: str, src: Path, out: Path, images_dir: Path | None):
    """Yield the records of one split file, placing each image under out/images/{raw}/."""
    images_dirs = [images_dir] if images_dir is not None else _beside(json_path)
    if images_dir is None and images_dirs:
        print(f"docvqa: {json_path.name}: images not next to it are looked for in "
              f"{', '.join(map(str, images_dirs))}")
    for i, item in enumerate(_load(json_path)):
        where = f"{json_path} item {i}"
        for field in ("questionId", "question", "image"):
            if field not in item:
                raise ConversionError(f"{where}: missing field '{field}'")
        answers = [str(a) for a in item.get("answers") or []]
        if split != "test_noanswer" and not answers:
            raise ConversionError(f"{where} (questionId={item['questionId']}): no answers")
        image = _resolve_image(item["image"], json_path, src, images_dirs, images_dir is not None)
        if image is None:
            looked = ", ".join(str(d) for d in images_dirs)
            raise ConversionError(
                f"{where}: image {item['image']!r} not found next to {json_path.name}"
                + (f" or in {looked}" if looked else " (set -o images_dir=FOLDER)")
            )
        rel = f"{raw}/{Path(item['image']).name}"
        link_or_copy(image, out / "images" / rel)
        yield {
            "id": str(item["questionId"]),
            "source": "docvqa",
            "conversations": [{
                "images": [rel],
                "user": "<|image_1|>\n" + str(item["question"]),
                "assistant": answers[0] if answers else "",
            }],
            "answers": answers,
        }
