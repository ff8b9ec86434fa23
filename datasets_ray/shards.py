"""Sharded Parquet: the record format with every record's images embedded, one row per record.

    out/train/part-00000.parquet, part-00001.parquet, …      (local or s3://, gs://, abfs://)

    id      string          the record's id
    row     int64           1-based row number within the shard (what a jsonl's line number is)
    record  string          the record as JSON, exactly as in {split}.jsonl (image paths kept as names)
    images  list<binary>    the encoded bytes of the record's images, in the order the record names them

`phi3v-ray convert NAME … --format parquet` writes it (`write_shards`); the pipeline reads a
train_file/val_file that is such a directory (or one shard) with Ray Data's read_parquet, and
needs no images_root. Prefer it when the data lives in a bucket and has many small images: one
request per shard instead of one per image, and no listing of millions of objects. jsonl + images
stays simpler to inspect and edit, and on local disk or NFS is as fast.

Pure Python and pyarrow: no torch, no ray (the converters call in here).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from phi3v_ray.storage import filesystem, is_dir, is_remote, join, list_names, upload_dir

SHARD_COLUMNS = ("id", "row", "record", "images")
DEFAULT_SHARD_ROWS = 256  # a few MB to a few hundred MB per shard; Ray Data reads shards in parallel
ROW_GROUP_ROWS = 32  # small row groups: a reader holds one group of images at a time


def is_parquet_input(path: str) -> bool:
    """A `.parquet` shard, or a directory holding them (asks the filesystem only for directories)."""
    path = str(path).rstrip("/")
    if path.endswith(".parquet"):
        return True
    if path.endswith((".jsonl", ".json")) or not path:
        return False
    return is_dir(path) and any(n.endswith(".parquet") for n in list_names(path))


def list_shards(path: str) -> list[str]:
    """The shards of a split: the file itself, or the directory's `*.parquet` in name order."""
    path = str(path).rstrip("/")
    if path.endswith(".parquet"):
        return [path]
    return [join(path, n) for n in list_names(path) if n.endswith(".parquet")]


def read_shard_records(shard: str) -> list[tuple[int, str]]:
    """(row, record JSON) of every row, without reading the image bytes (column projection)."""
    import pyarrow.parquet as pq

    fs, inner = filesystem(shard)
    schema = pq.read_schema(inner, filesystem=fs)
    missing = [c for c in SHARD_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"{shard}: not a phi3v-ray record shard, missing column(s) {missing} "
                         f"(`phi3v-ray convert … --format parquet` writes {list(SHARD_COLUMNS)})")
    table = pq.read_table(inner, filesystem=fs, columns=["row", "record"])
    return list(zip(table.column("row").to_pylist(), table.column("record").to_pylist()))


def write_shards(jsonl: str | Path, images_root: str | Path, out: str, shard_rows: int = DEFAULT_SHARD_ROWS) -> int:
    """Write one split's jsonl + images as shards under `out` (local or a URI); returns the record count.

    The shards are written to a local temporary directory first and moved (or uploaded) only when
    every one is complete, so a failed conversion leaves no shard behind; shards of an earlier
    conversion that this one does not overwrite are deleted afterwards.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .schema import iter_jsonl

    schema = pa.schema([("id", pa.string()), ("row", pa.int64()), ("record", pa.string()),
                        ("images", pa.list_(pa.binary()))])
    images_root = Path(images_root)
    n = 0
    with tempfile.TemporaryDirectory(prefix="phi3v-shards-") as tmp:
        batch: list[dict] = []
        shard_no = 0

        def flush():
            nonlocal batch, shard_no
            if batch:
                table = pa.Table.from_pylist(batch, schema=schema)
                pq.write_table(table, Path(tmp) / f"part-{shard_no:05d}.parquet", row_group_size=ROW_GROUP_ROWS)
                shard_no += 1
                batch = []

        for _, text in iter_jsonl(jsonl):
            rec = json.loads(text)
            rels = [rel for turn in rec.get("conversations", []) for rel in (turn.get("images") or [])]
            images = [(images_root / rel).read_bytes() for rel in rels]
            batch.append({"id": rec.get("id"), "row": len(batch) + 1, "record": text, "images": images})
            n += 1
            if len(batch) >= shard_rows:
                flush()
        flush()
        written = sorted(p.name for p in Path(tmp).iterdir())
        old = [name for name in (list_names(out) if is_remote(out) or Path(out).is_dir() else [])
               if name.endswith(".parquet") and name not in written]
        if is_remote(out):
            upload_dir(tmp, out)
        else:
            Path(out).mkdir(parents=True, exist_ok=True)
            for name in written:  # same-filesystem moves are renames; across filesystems a copy then rename
                staged = Path(out) / f".{name}.tmp"
                shutil.copyfile(Path(tmp) / name, staged)
                os.replace(staged, Path(out) / name)
        fs, inner = filesystem(out)
        for name in old:
            fs.delete_file(f"{inner.rstrip('/')}/{name}")
    return n


def convert_to_shards(local_dir: str | Path, splits: Iterable[str], out: str,
                      shard_rows: int = DEFAULT_SHARD_ROWS) -> dict[str, int]:
    """Every `{split}.jsonl` of a converted folder (with its images/) → `out/{split}/part-*.parquet`."""
    local_dir = Path(local_dir)
    return {split: write_shards(local_dir / f"{split}.jsonl", local_dir / "images", join(out, split), shard_rows)
            for split in splits}
