"""The jsonl record format every converter writes and every pipeline reads, and its validation.

One record per line:

    {"id": "abc", "source": "docvqa",
     "conversations": [{"images": ["documents/x.png"], "user": "<|image_1|>\\nWhat is ...?",
                        "assistant": "42"}, ...],
     ...extra fields such as "answers" (all references, for ANLS) or "task"...}

Image paths are relative to an images root. Image tags `<|image_k|>` are numbered 1..n across the
whole record: turn 1's images are 1..a, turn 2's continue at a+1. A turn's user text may omit its
tags (the prompt builder then puts them first); if it has tags they must be exactly that turn's
numbers, each once.

Pure Python: no torch, no ray. The converters and the Ray Data pipeline both call in here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from phi3v_ray.constants import image_tags
from phi3v_ray.storage import is_remote, open_text, write_text


class BadRecord(ValueError):
    """A record that cannot be trained on; says which file, line and record, and why."""

    def __init__(self, reason: str, *, path=None, line: int | None = None, record_id=None):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.line = line
        self.record_id = record_id
        super().__init__(self._message())

    def _message(self) -> str:
        where = self.path or "<record>"
        if self.line is not None:
            where += f":{self.line}"
        if self.record_id is not None:
            where += f" (id={self.record_id})"
        return f"{where}: {self.reason}"

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self):  # keep the fields when Ray pickles the error across processes
        return _rebuild_bad_record, (self.reason, self.path, self.line, self.record_id)


def _rebuild_bad_record(reason, path, line, record_id) -> BadRecord:
    return BadRecord(reason, path=path, line=line, record_id=record_id)


# ---------------------------------------------------------------------------------------------
# reading and writing jsonl


def iter_jsonl(path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) for every non-blank line of a jsonl file (local or s3://, gs://, …)."""
    with open_text(str(path)) as f:
        for line_no, text in enumerate(f, start=1):
            text = text.rstrip("\n")
            if text.strip():
                yield line_no, text


def parse_line(text: str, path=None, line: int | None = None) -> dict:
    """Parse one jsonl line into a dict; malformed JSON or a non-object raises BadRecord."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord(f"malformed JSON: {e.msg} at column {e.colno}", path=path, line=line) from None
    if not isinstance(rec, dict):
        raise BadRecord(f"expected a JSON object, got {type(rec).__name__}", path=path, line=line)
    return rec


def write_jsonl(path, records: Iterable[dict]) -> int:
    """Write records one per line (UTF-8, via a temp file then rename, or one upload); returns how many."""
    if is_remote(str(path)):
        lines = [json.dumps(rec, ensure_ascii=False) + "\n" for rec in records]
        write_text(str(path), "".join(lines))
        return len(lines)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed writer leaves nothing half-written
        raise
    return n


# ---------------------------------------------------------------------------------------------
# one record


def _check_image_path(rel, images_root, root_resolved: Path | None) -> str:
    """Return the normalised relative path of one image, or raise ValueError saying why not.

    On object storage (root_resolved None) only the path's shape is checked here: the
    preprocessing actor finds a missing object when it fetches it (a decode-stage bad record),
    instead of the driver asking the bucket about every image.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError(f"image path must be a non-empty string, got {rel!r}")
    posix = rel.replace("\\", "/")
    if posix.startswith("/") or os.path.isabs(rel) or re.match(r"^[A-Za-z]:", posix):
        raise ValueError(f"image {rel!r} is an absolute path; paths must be relative to {images_root}")
    parts = [p for p in PurePosixPath(posix).parts if p != "."]
    if ".." in parts:
        raise ValueError(f"image {rel!r} uses '..' and could escape {images_root}")
    norm = "/".join(parts)
    if root_resolved is None:
        return norm
    full = images_root / norm
    # Resolving follows symlinks: a link that points outside the root is refused.
    if not full.resolve().is_relative_to(root_resolved):
        raise ValueError(f"image {rel!r} resolves outside {images_root} (symlink?)")
    if not full.is_file():
        raise ValueError(f"image {rel!r} does not exist under {images_root}")
    return norm


def validate_record(
    rec: dict, images_root, *, max_images_per_turn: int = 16, path=None, line: int | None = None
) -> dict:
    """Check one record and return its normalised copy; any problem raises BadRecord.

    Normalised: image paths in posix form without './'; extra top-level fields kept as they are.
    """
    rid = rec.get("id") if isinstance(rec, dict) else None

    def bad(reason: str) -> BadRecord:
        return BadRecord(reason, path=path, line=line, record_id=rid if isinstance(rid, str) else None)

    if not isinstance(rec, dict):
        raise bad(f"expected a JSON object, got {type(rec).__name__}")
    for field, kind in (("id", str), ("source", str), ("conversations", list)):
        if field not in rec:
            raise bad(f"missing required field '{field}'")
        if not isinstance(rec[field], kind):
            raise bad(f"field '{field}' must be {kind.__name__}, got {type(rec[field]).__name__}")
    if not rec["id"].strip():
        raise bad("field 'id' is empty")
    if not rec["conversations"]:
        raise bad("'conversations' is empty")

    if images_root is None or is_remote(str(images_root)):  # object storage, or images embedded (Parquet)
        root_resolved = None
    else:
        images_root = Path(images_root)
        root_resolved = images_root.resolve()
    turns = []
    next_tag = 1
    for t, turn in enumerate(rec["conversations"], start=1):
        if not isinstance(turn, dict):
            raise bad(f"turn {t} must be an object, got {type(turn).__name__}")
        for field in ("user", "assistant"):
            if field not in turn:
                raise bad(f"turn {t} is missing '{field}'")
            if not isinstance(turn[field], str):
                raise bad(f"turn {t} '{field}' must be str, got {type(turn[field]).__name__}")
        images = turn.get("images", [])
        if not isinstance(images, list):
            raise bad(f"turn {t} 'images' must be a list, got {type(images).__name__}")
        if len(images) > max_images_per_turn:
            raise bad(f"turn {t} has {len(images)} images, more than the limit {max_images_per_turn}")
        if not turn["assistant"].strip():
            raise bad(f"turn {t} has an empty assistant answer")
        if image_tags(turn["assistant"]):
            raise bad(f"turn {t} assistant answer contains image tags")

        norm_images = []
        for rel in images:
            try:
                norm_images.append(_check_image_path(rel, images_root, root_resolved))
            except ValueError as e:
                raise bad(str(e)) from None

        expected = list(range(next_tag, next_tag + len(images)))
        tags = image_tags(turn["user"])
        if tags:
            repeated = sorted({k for k in tags if tags.count(k) > 1})
            if repeated:
                raise bad(f"turn {t} repeats image tag(s) {repeated}")
            if sorted(tags) != expected:
                raise bad(
                    f"turn {t} tags {sorted(tags)} do not match its {len(images)} image(s); "
                    f"expected tags {expected}"
                )
        next_tag += len(images)
        turns.append({**turn, "images": norm_images})

    return {**rec, "conversations": turns}


# ---------------------------------------------------------------------------------------------
# whole files


def validate_file(
    jsonl_path,
    images_root,
    on_bad_record: str = "fail",
    quarantine_path=None,
    *,
    max_images_per_turn: int = 16,
) -> tuple[list[dict], int]:
    """Validate every line of a jsonl file; returns (good normalised records, number of bad ones).

    on_bad_record="fail": raise BadRecord at the first problem (file, line, id, reason).
    on_bad_record="skip": drop bad lines; if `quarantine_path` is given each bad line is written
    there as {"file", "line", "id", "reason", "raw"} so that good + bad == non-blank lines.
    A repeated id is a bad record (the first occurrence is kept).
    """
    good, quarantined = validate_lines(iter_jsonl(jsonl_path), jsonl_path, images_root, on_bad_record,
                                       max_images_per_turn=max_images_per_turn)
    if quarantine_path is not None and on_bad_record == "skip":
        write_jsonl(quarantine_path, quarantined)
    return [rec for _, _, rec in good], len(quarantined)


def validate_lines(
    lines: Iterable[tuple[int, str]],
    jsonl_path,
    images_root,
    on_bad_record: str = "fail",
    *,
    max_images_per_turn: int = 16,
) -> tuple[list[tuple[int, str, dict]], list[dict]]:
    """`validate_file` on lines already read: ([(line, text, normalised record)], [quarantine entries])."""
    if on_bad_record not in ("fail", "skip"):
        raise ValueError(f"on_bad_record must be 'fail' or 'skip', got {on_bad_record!r}")
    good: list[tuple[int, str, dict]] = []
    quarantined: list[dict] = []
    seen: dict[str, int] = {}
    for line_no, text in lines:
        try:
            rec = parse_line(text, jsonl_path, line_no)
            rec = validate_record(
                rec, images_root, max_images_per_turn=max_images_per_turn, path=jsonl_path, line=line_no
            )
            if rec["id"] in seen:
                raise BadRecord(
                    f"duplicate id (first seen on line {seen[rec['id']]})",
                    path=jsonl_path, line=line_no, record_id=rec["id"],
                )
        except BadRecord as e:
            if on_bad_record == "fail":
                raise
            quarantined.append(
                {"file": str(jsonl_path), "line": line_no, "id": e.record_id, "reason": e.reason, "raw": text}
            )
            continue
        seen[rec["id"]] = line_no
        good.append((line_no, text, rec))
    return good, quarantined
