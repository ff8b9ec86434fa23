"""The Cauldron (HuggingFaceM4/the_cauldron parquet shards) -> multi-turn records.

Raw layout: `src/{subset}/*.parquet` (or `src` itself holding one subset's shards), columns

    images: list<{"bytes": binary, "path": string}>
    texts:  list<{"user": string, "assistant": string, "source": string}>

Each row becomes one record with one turn per text; every image belongs to turn 1 (its user text
starts with all the tags). Images are written as files named by content hash, so a picture repeated
across rows is stored once. The Cauldron has only a train split; everything goes to train.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from ._common import (
    ConversionError, as_list, image_bytes, iter_parquet_rows, save_image_bytes, tags, write_splits,
)

DEFAULT_SUBSETS = ["docvqa", "hateful_memes", "nlvr2"]


def _subset_dirs(src: Path, subsets) -> dict[str, Path]:
    if subsets:
        dirs = {name: src / name for name in as_list(subsets, "subsets")}
        for name, d in dirs.items():
            if not any(d.rglob("*.parquet")):
                raise ConversionError(f"{d}: no parquet files for subset {name!r}")
        return dirs
    if any(src.glob("*.parquet")):
        return {src.name: src}
    dirs = {name: src / name for name in DEFAULT_SUBSETS if any((src / name).rglob("*.parquet"))}
    if not dirs:
        raise ConversionError(f"{src}: no parquet files and none of the subsets {DEFAULT_SUBSETS}")
    return dirs


def convert_cauldron(src: Path, out: Path, *, subsets=None) -> dict[str, int]:
    """Convert Cauldron subsets into one train.jsonl; `subsets` picks folders under src."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConversionError(f"{src}: Cauldron folder not found")
    records = []
    for subset, folder in _subset_dirs(src, subsets).items():
        for shard in sorted(folder.rglob("*.parquet")):
            for row_no, row in enumerate(iter_parquet_rows(shard, ["images", "texts"])):
                where = f"{shard} row {row_no}"
                rels = [
                    save_image_bytes(image_bytes(cell, f"{where} image {i}"), out / "images", subset, where)
                    for i, cell in enumerate(row["images"] or [])
                ]
                texts = row["texts"] or []
                if not texts:
                    raise ConversionError(f"{where}: 'texts' is empty")
                turns = []
                for t, text in enumerate(texts):
                    user, answer = (text or {}).get("user"), (text or {}).get("assistant")
                    if not isinstance(user, str) or not isinstance(answer, str) or not answer.strip():
                        raise ConversionError(f"{where}: turn {t + 1} lacks user text or a non-empty answer")
                    first = t == 0
                    turns.append({
                        "images": rels if first else [],
                        "user": (tags(len(rels)) + user) if first else user,
                        "assistant": answer,
                    })
                records.append({
                    "id": f"{subset}-{shard.stem}-{row_no}",
                    "source": f"cauldron/{subset}",
                    "conversations": turns,
                })
    return write_splits(out, {"train": records})
