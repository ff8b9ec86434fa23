"""The small DocVQA parquet sample (as on the Hub, e.g. 1200 examples) -> DocVQA records.

Raw layout: parquet shards under `src` (any depth) named `{split}-*.parquet` or `{split}.parquet`,
columns `id`, `image` ({"bytes", "path"}), `query` ({"en": ..., "de": ...} or a plain string) and
`answers` (list of strings). Every reference answer is kept in `answers` for ANLS.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ._common import ConversionError, image_bytes, iter_parquet_rows, save_image_bytes, write_splits


def convert_docvqa_mini(src: Path, out: Path, *, language: str = "en") -> dict[str, int]:
    """Convert the DocVQA mini parquet; the split is the shard name before the first '-'."""
    src, out = Path(src), Path(out)
    shards = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
    if not shards or not shards[0].is_file():
        raise ConversionError(f"{src}: no parquet files found")
    by_split: dict[str, list[dict]] = defaultdict(list)
    for shard in shards:
        split = shard.stem.split("-")[0]
        for row_no, row in enumerate(iter_parquet_rows(shard, ["id", "image", "query", "answers"])):
            where = f"{shard} row {row_no}"
            query = row["query"]
            if isinstance(query, dict):
                query = query.get(language)
            if not isinstance(query, str) or not query.strip():
                raise ConversionError(f"{where}: no {language!r} question in 'query'")
            answers = [str(a) for a in row["answers"] or []]
            if not answers:
                raise ConversionError(f"{where}: 'answers' is empty")
            rel = save_image_bytes(image_bytes(row["image"], where), out / "images", split, where)
            by_split[split].append({
                "id": str(row["id"]),
                "source": "docvqa_mini",
                "conversations": [{"images": [rel], "user": "<|image_1|>\n" + query, "assistant": answers[0]}],
                "answers": answers,
            })
    return write_splits(out, by_split)
