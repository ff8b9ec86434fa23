"""Any table of (image, question, answer) rows -> single-turn records.

`src` is one .parquet/.jsonl/.csv file (its rows go to split `split`) or a folder of them, where a
file's split is its name before the first '-' (train.jsonl, val.csv, test-00000-of-00001.parquet).
Columns are named by options. An image cell may be a path (relative to `images_root`, default the
table's folder, or absolute), encoded bytes, a {"bytes", "path"} struct, or a list of those for
multi-image rows. An answer cell may be a string or a list of references (kept in `answers`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from pathlib import Path

from phi3v_ray.constants import image_tags

from ._common import (
    ConversionError, iter_parquet_rows, link_or_copy, require_file, safe_rel, save_image_bytes, tags,
    write_splits,
)

SUFFIXES = (".parquet", ".jsonl", ".csv")


def _rows(path: Path, columns: list[str]):
    if path.suffix == ".parquet":
        yield from iter_parquet_rows(path, columns)
        return
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".csv":
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ConversionError(f"{path}: missing column(s) {missing}; has {reader.fieldnames}")
            yield from reader
            return
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConversionError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
            missing = [c for c in columns if c not in row]
            if missing:
                raise ConversionError(f"{path}:{line_no}: missing field(s) {missing}")
            yield row


def _place_image(cell, images_root: Path, images_out: Path, split: str, where: str) -> str:
    """Put one image cell under images_out; returns its path relative to images_out."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return save_image_bytes(bytes(cell), images_out, split, where)
    if not isinstance(cell, str) or not cell.strip():
        raise ConversionError(f"{where}: image cell is neither a path nor encoded bytes: {cell!r}")
    path = Path(cell)
    if path.is_absolute():
        rel = f"external/{hashlib.sha1(cell.encode()).hexdigest()[:12]}-{path.name}"
    else:
        rel = safe_rel(cell, f"{where} (set images_root for paths outside the table's folder)")
        path = images_root / rel
    require_file(path, f"image named at {where}")
    link_or_copy(path, images_out / rel)
    return rel


def convert_generic(
    src: Path,
    out: Path,
    *,
    image_col: str = "image",
    question_col: str = "question",
    answer_col: str = "answer",
    id_col: str | None = None,
    images_root=None,
    split: str = "train",
    source: str = "generic",
) -> dict[str, int]:
    """Convert a column-mapped table (or folder of tables) to jsonl + images."""
    src, out = Path(src), Path(out)
    split, source = str(split), str(source)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise ConversionError(f"{src}: no {'/'.join(SUFFIXES)} files found")
        jobs = [(p.stem.split("-")[0], p) for p in files]
    else:
        require_file(src, "table")
        if src.suffix not in SUFFIXES:
            raise ConversionError(f"{src}: unsupported table type (use {', '.join(SUFFIXES)})")
        jobs = [(split, src)]

    columns = [image_col, question_col, answer_col] + ([id_col] if id_col else [])
    by_split: dict[str, list[dict]] = defaultdict(list)
    for split_name, path in jobs:
        root = Path(images_root) if images_root else path.parent
        for row_no, row in enumerate(_rows(path, columns)):
            where = f"{path} row {row_no}"
            cells = row[image_col] if isinstance(row[image_col], list) else [row[image_col]]
            rels = [_place_image(c, root, out / "images", split_name, where) for c in cells]
            question = row[question_col]
            if not isinstance(question, str) or not question.strip():
                raise ConversionError(f"{where}: empty question in column {question_col!r}")
            raw_answer = row[answer_col]
            answers = [str(a) for a in raw_answer] if isinstance(raw_answer, list) else [str(raw_answer)]
            if raw_answer is None or not answers or not answers[0].strip():
                raise ConversionError(f"{where}: empty answer in column {answer_col!r}")
            rec_id = str(row[id_col]) if id_col else f"{split_name}-{path.stem}-{row_no}"
            record = {
                "id": rec_id,
                "source": source,
                "conversations": [{
                    "images": rels,
                    "user": question if image_tags(question) else tags(len(rels)) + question,
                    "assistant": answers[0],
                }],
            }
            if isinstance(raw_answer, list):
                record["answers"] = answers
            by_split[split_name].append(record)
    return write_splits(out, by_split)
