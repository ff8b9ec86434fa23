"""Small helpers the converters share: errors, image files, option parsing, parquet rows, and
writing the split files all or nothing."""

from __future__ import annotations

import hashlib
import json
import io
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from phi3v_ray.constants import image_tag

# Pillow format name -> file extension for images stored as encoded bytes.
_EXT = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif"}


class ConversionError(ValueError):
    """Raw input a converter cannot use; the message names the file and the problem."""


_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def write_splits(out: Path, splits: dict[str, Iterable[dict]]) -> dict[str, int]:
    """Write `out/{split}.jsonl` for every split, all or nothing; returns {split: n_records}.

    The records of a split may be a list or a generator that does the converting as it goes. Each
    split is written to a temporary name in `out` first; only when every split has been written are
    they renamed into place (os.replace, atomic within one file system). If anything fails on the
    way, the temporary files are removed and no split file in `out` has been touched, so a failed
    run never leaves a split file that looks finished. (Images already placed under out/images
    stay; a rerun reuses them.)
    """
    out = Path(out)
    for split in splits:
        if not _SPLIT_NAME.fullmatch(str(split)):
            raise ConversionError(f"split name {split!r} is not a plain file name (letters, digits, _ . -)")
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, tuple[Path, int]] = {}
    try:
        for split, records in splits.items():
            tmp = out / f".{split}.jsonl.{os.getpid()}.tmp"
            written[split] = (tmp, 0)  # registered before opening, so a failure removes it
            n = 0
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    n += 1
            written[split] = (tmp, n)
    except BaseException:
        for tmp, _ in written.values():
            tmp.unlink(missing_ok=True)
        raise
    for split, (tmp, _) in written.items():
        os.replace(tmp, out / f"{split}.jsonl")
    return {split: n for split, (_, n) in written.items()}


def as_list(value, name: str) -> list[str]:
    """An option given as a list or as a comma-separated string ("a,b,c")."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise ConversionError(f"option {name!r} must be a list or comma-separated string, got {value!r}")


def as_mapping(value, name: str) -> dict[str, str]:
    """An option given as a dict or as "out:raw,out:raw" (e.g. "train:train,val:dev_seen")."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str):
        pairs = [p.split(":", 1) for p in as_list(value, name)]
        if any(len(p) != 2 for p in pairs):
            raise ConversionError(f"option {name!r} must look like 'out:raw,out:raw', got {value!r}")
        return {k.strip(): v.strip() for k, v in pairs}
    raise ConversionError(f"option {name!r} must be a dict or 'out:raw,...' string, got {value!r}")


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConversionError(f"{path}: {what} not found")
    return path


def safe_rel(name: str, where: str) -> str:
    """A raw dataset's relative file name, refused if absolute or climbing out with '..'."""
    posix = str(name).replace("\\", "/")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if posix.startswith("/") or ".." in parts or not parts:
        raise ConversionError(f"{where}: unsafe or empty file name {name!r}")
    return "/".join(parts)


def link_or_copy(src: Path, dst: Path) -> None:
    """Put `src` at `dst` (hard link when possible, else copy); existing `dst` is kept.

    Never a symlink: validation refuses links that resolve outside the images root.
    """
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_image_bytes(data: bytes, images_dir: Path, subdir: str, where: str) -> str:
    """Write encoded image bytes under images_dir/subdir, named by content hash; returns rel path.

    The bytes are decoded once to check they are an image (`where` names the source row in the
    error). Identical images are written once.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
    except Exception as e:  # Pillow raises many types for bad bytes
        raise ConversionError(f"{where}: image bytes cannot be decoded ({e})") from None
    ext = _EXT.get(fmt or "", (fmt or "img").lower())
    rel = f"{subdir}/{hashlib.sha1(data).hexdigest()[:20]}.{ext}"
    dst = images_dir / rel
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dst)
    return rel


def image_bytes(value, where: str) -> bytes:
    """Encoded bytes from a parquet image cell: raw bytes or {"bytes": ..., "path": ...}."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value)
    raise ConversionError(f"{where}: image cell has no encoded bytes")


def iter_parquet_rows(path: Path, columns: list[str] | None = None) -> Iterator[dict]:
    """Rows of a parquet file as dicts, read in batches so big shards stay out of memory."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ConversionError(f"{path}: cannot read parquet ({e})") from None
    missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
    if missing:
        raise ConversionError(f"{path}: missing column(s) {missing}; has {pf.schema_arrow.names}")
    for batch in pf.iter_batches(batch_size=256, columns=columns):
        yield from batch.to_pylist()


def tags(n: int) -> str:
    """`<|image_1|>...<|image_n|>` followed by a newline (empty string for no images)."""
    return "".join(image_tag(k) for k in range(1, n + 1)) + ("\n" if n else "")


def read_raw_jsonl(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """(where, item) for each non-blank line of a raw jsonl file; malformed lines and missing fields raise."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConversionError(f"{where}: malformed JSON ({e.msg})") from None
            for field in required:
                if field not in item:
                    raise ConversionError(f"{where}: missing field '{field}'")
            yield where, item
