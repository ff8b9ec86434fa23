"""NLVR2 (official release) -> two-image yes/no records.

The split files hold one JSON object per line:

    {"identifier": "train-10171-0-0", "sentence", "label": "True"|"False", "directory": 65, ...}

Both ways the official download is laid out are found from `src` by themselves:

  flat:                                 GitHub clone + image zips (as ViLT's DATA.md lays it out):
    {train,dev,test1}.json                nlvr/                      git clone of lil-lab/nlvr
      (or data/*.json)                      nlvr2/data/{train,dev,test1}.json
    images/train/{directory}/...png         images/train/{directory}/...png     (train.zip)
    images/dev/...png                       dev/...png                          (dev.zip, beside images/)
    images/test1/...png                     test1/...png                        (test1.zip)

For the clone, `src` may be the clone, its parent, `nlvr2/` or `nlvr2/data/`. A split's images are
looked for in `{split}/` and `images/{split}/` of each folder from the json folder up to `src` (for
the clone: up to the folder holding the clone); `images_dir` names the one root of train/, dev/,
test1/ instead. Train images are also found without their {directory} level.

An identifier's image pair is named by the identifier minus its last "-N" part plus -img0/-img1.
The files are linked as they are: some official ".png" files hold JPEG data, which the image
decoder reads by content. Record: "<|image_1|><|image_2|>\\n{sentence} Answer yes or no." ->
"yes" / "no".
"""

from __future__ import annotations

from pathlib import Path

from ._common import ConversionError, as_mapping, link_or_copy, read_raw_jsonl, write_splits

DEFAULT_SPLITS = {"train": "train", "val": "dev", "test": "test1"}
LABELS = {"true": "yes", "false": "no"}
# Where the split files may sit under src: flat, data/, inside the clone, above the clone.
JSON_DIRS = (".", "data", "nlvr2/data", "nlvr/nlvr2/data")


def _find_json(src: Path, raw: str) -> Path:
    for sub in JSON_DIRS:
        cand = src / sub / f"{raw}.json"
        if cand.is_file():
            return cand
    raise ConversionError(
        f"{src}: NLVR2 split file {raw}.json not found (looked in {', '.join(JSON_DIRS)})"
    )


def _levels(json_dir: Path, src: Path) -> list[Path]:
    """The json folder and the folders above it, up to `src`, or up to the folder holding the
    clone when the json files sit in the clone's nlvr2/data/."""
    clone = json_dir.parts[-2:] == ("nlvr2", "data") and len(json_dir.parents) > 2
    top = json_dir.parents[2] if clone else src
    levels = [json_dir]
    while levels[-1] != top and levels[-1] != levels[-1].parent:
        levels.append(levels[-1].parent)
    return levels


def _image_folders(json_path: Path, src: Path, raw: str, images_dir: Path | None) -> list[Path]:
    """Existing folders that may hold split `raw`'s images, nearest first."""
    if images_dir is not None:
        roots = [images_dir]
    else:
        roots = [r for level in _levels(json_path.parent, src) for r in (level / "images", level)]
    folders, seen = [], set()
    for root in roots:
        folder = root / raw
        if folder.is_dir() and folder.resolve() not in seen:
            seen.add(folder.resolve())
            folders.append(folder)
    return folders


def _image_pair(item: dict, folders: list[Path]) -> list[Path] | None:
    stem = item["identifier"].rsplit("-", 1)[0]
    for folder in folders:
        places = [folder / str(item["directory"]), folder] if "directory" in item else [folder]
        for place in places:
            pair = [place / f"{stem}-img{i}.png" for i in (0, 1)]
            if all(p.is_file() for p in pair):
                return pair
    return None


def convert_nlvr2(
    src: Path, out: Path, *, images_dir=None, splits=None, skip_missing_images: bool = False
) -> dict[str, int]:
    """Convert NLVR2; missing images raise unless skip_missing_images (then counted and printed)."""
    src, out = Path(src).absolute(), Path(out)
    images_dir = Path(images_dir) if images_dir else None
    mapping = as_mapping(splits, "splits") if splits else dict(DEFAULT_SPLITS)
    jobs = {}
    for split, raw in mapping.items():
        json_path = _find_json(src, raw)
        folders = _image_folders(json_path, src, raw, images_dir)
        if not folders:
            if images_dir is not None:
                where = str(images_dir)
            else:
                where = ", ".join(str(d) for d in _levels(json_path.parent, src)) + " (or their images/)"
            raise ConversionError(
                f"{json_path}: image folder '{raw}/' not found in {where}; "
                f"unpack {raw}.zip there or set -o images_dir=FOLDER"
            )
        print(f"nlvr2: {split}: {json_path} with images from {', '.join(map(str, folders))}")
        jobs[split] = (json_path, raw, folders)
    return write_splits(out, {
        split: _records(split, json_path, raw, folders, out, skip_missing_images)
        for split, (json_path, raw, folders) in jobs.items()
    })


def _records(split: str, json_path: Path, raw: str, folders: list[Path], out: Path, skip_missing: bool):
    """Yield one split's records, linking each image pair under out/images/{raw}/."""
    missing = 0
    for where, item in read_raw_jsonl(json_path, ("identifier", "sentence", "label")):
        answer = LABELS.get(str(item["label"]).lower())
        if answer is None:
            raise ConversionError(f"{where}: label must be True or False, got {item['label']!r}")
        pair = _image_pair(item, folders)
        if pair is None:
            if skip_missing:
                missing += 1
                continue
            raise ConversionError(
                f"{where}: images for {item['identifier']} not found in {', '.join(map(str, folders))}"
            )
        rels = [f"{raw}/{p.name}" for p in pair]
        for p, rel in zip(pair, rels):
            link_or_copy(p, out / "images" / rel)
        yield {
            "id": item["identifier"],
            "source": "nlvr2",
            "conversations": [{
                "images": rels,
                "user": f"<|image_1|><|image_2|>\n{item['sentence']} Answer yes or no.",
                "assistant": answer,
            }],
        }
    if missing:
        print(f"nlvr2: {split}: skipped {missing} example(s) whose images are missing")
