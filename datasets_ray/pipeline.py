"""The Ray Data pipeline: jsonl records → validated → decoded, HD-cropped, tokenized numpy rows.

    driver: validate_file per jsonl ──▶ {work_dir}/{split}.manifest.jsonl (id, _file, _line, record)
    Ray Data: read_json(manifest) ──▶ map_batches(Phi3VPreprocessor) ──▶ rows
    training worker: iter_train_batches(shard, ...) ──▶ collate (right padding) ──▶ torch batches

Rows (one per record; image counts and lengths differ from row to row, Ray Data carries the
ragged columns as variable-shaped tensors):

    id            str
    input_ids     int64 (T,)            −k at image k's placeholder positions
    labels        int64 (T,)            −100 except on answer tokens
    pixel_values  float32 (n_img, num_crops+1, 3, 336, 336)
    image_sizes   int64 (n_img, 2)      padded HD (H, W) per image
    num_images    int64                 n_img
    num_tokens    int64                 T

Bad records never disappear silently. The driver pass finds what the jsonl shows (malformed JSON,
missing fields, missing or escaping image paths, tag mismatches, empty answers, duplicate ids);
the actors find what only decoding shows (truncated or non-image files, images over max_pixels,
sequences over max_length under overflow="reject"). With on_bad_record="fail" the first one
raises `BadRecord` naming the jsonl file, line, record id and reason. With "skip" the driver writes
`{quarantine_dir}/{split}.quarantine.jsonl`, each actor appends to its own
`{quarantine_dir}/{split}.decode-quarantine.{uuid}.jsonl`, and `quarantine_report` counts both.

The manifest is always written (not only when records were dropped): it carries the line number
of every record into the actors, holds the normalised image paths, and keeps the Arrow schema flat
(the record travels as one JSON string, so records with different extra fields read alike). On a
multi-node cluster work_dir and quarantine_dir must be on storage every node sees.

Order is deterministic (`preserve_order`), so a restarted run sees the same rows in the same
order: `iter_train_batches` shuffles with a local buffer seeded by seed + epoch and skips the
batches a resumed run has already trained on.

CPU rule (STACK_NOTES): Ray Data gets only the CPUs that training workers leave. With
`ray.init(num_cpus=2)` and two 1-CPU workers nothing is left and the first read waits forever.
Preprocessing actors ask for a fraction of a CPU (0.5 by default), read tasks for 0.25; size the
cluster with `recommended_ray_init_cpus` and check it on the driver with `check_cpu_budget`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from PIL import Image, ImageFile
from ray.data import ActorPoolStrategy, DataContext
from ray.data.collate_fn import NumpyBatchCollateFn

from phi3v_ray.collate import collate
from phi3v_ray.examples import SequenceTooLong, build_example
from phi3v_ray.processor import MAX_NUM_CROPS, Phi3VProcessor

from .schema import BadRecord, iter_jsonl, validate_file, write_jsonl

logger = logging.getLogger(__name__)

READ_NUM_CPUS = 0.25  # reading the manifest is light; a whole CPU per read task would starve training
NODE_RESOURCE_AMOUNT = 0.001  # a sliver of the custom resource: pins actors to marked nodes, caps nothing
ROW_COLUMNS = ("id", "input_ids", "labels", "pixel_values", "image_sizes", "num_images", "num_tokens", "task", "answers")
MANIFEST_COLUMNS = ("id", "_file", "_line", "record")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataSettings:
    """Everything the data pipeline needs; the training config maps its data fields onto this."""

    train_files: list[str] = field(default_factory=list, metadata={"help": "training jsonl files (the recipe's record format)"})
    images_root: str = _f("", "directory the records' image paths are relative to")
    processor_dir: str = _f("", "checkpoint directory holding tokenizer.json (and preprocessor_config.json)")
    val_files: list[str] = field(default_factory=list, metadata={"help": "validation jsonl files (optional)"})
    num_crops: int = _f(16, "HD crop budget per image, 1..16 (recipe: 16 for documents, 4 for video frames)")
    max_length: int | None = _f(8192, "longest tokenized example (8 frames at 4 crops are 6056 image tokens); None = no limit")
    overflow: str = _f("reject", "reject | truncate: examples over max_length are bad records, or lose their earliest turns")
    on_bad_record: str = _f("fail", "fail | skip: skip quarantines each bad record with its reason and goes on")
    quarantine_dir: str | None = _f(None, "where skipped records are written (required for skip); one per run: a build clears its split's old entries")
    work_dir: str | None = _f(None, "where the manifests go; default quarantine_dir, else a temporary directory")
    max_pixels: int = _f(64_000_000, "images with more pixels (width × height) are refused before decoding")
    max_images_per_turn: int = _f(16, "turns with more images are bad records")
    preprocess_concurrency: int | tuple[int, int] = _f(1, "preprocessing actors: n, or (min, max) to autoscale")
    preprocess_batch_size: int = _f(4, "records per map_batches call (keep small: an 8-frame record at 16 crops is 180 MB)")
    num_cpus_per_actor: float = _f(0.5, "CPUs each preprocessing actor asks for (fractions are fine)")
    node_resource: str | None = _f(None, "custom resource marking CPU nodes for preprocessing, e.g. 'data_node' (None = anywhere)")
    object_store_memory_limit: int | None = _f(None, "bytes of object store Ray Data may fill for this dataset (None = Ray's default)")
    seed: int = _f(0, "seed for the per-epoch shuffle (seed + epoch)")
    system: str | None = _f(None, "system prompt put before the first turn (None = none, as in the recipe)")

    def __post_init__(self) -> None:
        self.train_files = [str(p) for p in self.train_files]
        self.val_files = [str(p) for p in self.val_files]
        if isinstance(self.preprocess_concurrency, list):  # from YAML / JSON
            self.preprocess_concurrency = tuple(self.preprocess_concurrency)

    def validate(self) -> "DataSettings":
        """Check every field on the driver; raise once, listing each problem with its fix."""
        problems: list[str] = []

        def bad(name: str, fix: str) -> None:
            problems.append(f"{name}={getattr(self, name)!r}: {fix}")

        if not self.train_files:
            bad("train_files", "name at least one training jsonl")
        for name in ("train_files", "val_files"):
            missing = [p for p in getattr(self, name) if not Path(p).is_file()]
            if missing:
                problems.append(f"{name}: no such file(s) {missing}")
        if not self.images_root or not Path(self.images_root).is_dir():
            bad("images_root", "set it to the directory the records' image paths are relative to")
        if not self.processor_dir or not (Path(self.processor_dir) / "tokenizer.json").is_file():
            bad("processor_dir", "set it to a checkpoint directory that holds tokenizer.json")
        if not isinstance(self.num_crops, int) or not 1 <= self.num_crops <= MAX_NUM_CROPS:
            bad("num_crops", f"use an integer in 1..{MAX_NUM_CROPS}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            bad("max_length", "use a positive integer, or None for no limit")
        if self.overflow not in ("reject", "truncate"):
            bad("overflow", "use 'reject' or 'truncate'")
        if self.on_bad_record not in ("fail", "skip"):
            bad("on_bad_record", "use 'fail' or 'skip'")
        if self.on_bad_record == "skip" and not self.quarantine_dir:
            bad("quarantine_dir", "set a directory: on_bad_record='skip' writes every skipped record there")
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            bad("max_pixels", "use a positive integer (64_000_000 is a 8000×8000 image)")
        if not isinstance(self.max_images_per_turn, int) or self.max_images_per_turn < 1:
            bad("max_images_per_turn", "use a positive integer")
        c = self.preprocess_concurrency
        if not (
            (isinstance(c, int) and c >= 1)
            or (isinstance(c, tuple) and len(c) == 2 and all(isinstance(x, int) for x in c) and 1 <= c[0] <= c[1])
        ):
            bad("preprocess_concurrency", "use an integer ≥ 1 or a (min, max) pair with 1 ≤ min ≤ max")
        if not isinstance(self.preprocess_batch_size, int) or self.preprocess_batch_size < 1:
            bad("preprocess_batch_size", "use a positive integer (a few records)")
        if not isinstance(self.num_cpus_per_actor, (int, float)) or self.num_cpus_per_actor <= 0:
            bad("num_cpus_per_actor", "use a positive number; fractions such as 0.5 are fine")
        if self.object_store_memory_limit is not None and self.object_store_memory_limit < 1:
            bad("object_store_memory_limit", "use a positive number of bytes, or None")
        if problems:
            raise ValueError("invalid data settings:\n  - " + "\n  - ".join(problems))
        return self

    @property
    def max_actors(self) -> int:
        c = self.preprocess_concurrency
        return c[1] if isinstance(c, tuple) else c


# ---------------------------------------------------------------------------------------------
# resources


def preprocess_cpus(settings: DataSettings) -> float:
    """Logical CPUs Ray Data holds at its peak: every preprocessing actor plus one read task."""
    return settings.max_actors * settings.num_cpus_per_actor + READ_NUM_CPUS


def recommended_ray_init_cpus(num_workers: int, cpus_per_worker: float, settings: DataSettings) -> int:
    """Logical CPUs for `ray.init(num_cpus=...)` so training workers and Ray Data both fit.

    Ray Data only sees what the workers leave; when that is less than one read task plus one
    actor the dataset waits forever. Logical CPUs may exceed the cores (2 cores → num_cpus=4 here).
    """
    return math.ceil(num_workers * cpus_per_worker + preprocess_cpus(settings))


def check_cpu_budget(cluster_cpus: float, num_workers: int, cpus_per_worker: float, settings: DataSettings) -> None:
    """Raise on the driver if the training workers would leave Ray Data too few CPUs to start."""
    left = cluster_cpus - num_workers * cpus_per_worker
    need = settings.num_cpus_per_actor + READ_NUM_CPUS
    if left < need:
        raise ValueError(
            f"Ray Data would get {left:g} CPUs after {num_workers} training workers × {cpus_per_worker:g} CPUs "
            f"of {cluster_cpus:g}, but needs at least {need:g} (one actor at {settings.num_cpus_per_actor:g} "
            f"+ a read task at {READ_NUM_CPUS:g}); the dataset would wait forever. Fix: "
            f"ray.init(num_cpus={recommended_ray_init_cpus(num_workers, cpus_per_worker, settings)}), "
            "or fewer CPUs per worker, or a smaller num_cpus_per_actor"
        )


def configure_data_context(ctx: DataContext | None = None) -> DataContext:
    """Deterministic order for exact resume. Default: the current context.

    Ray Train copies the driver's current DataContext when the trainer is built and applies its
    execution options to every shard, so this must run on the driver before the trainer exists
    (`build_dataset` does it).
    """
    ctx = ctx or DataContext.get_current()
    ctx.execution_options.preserve_order = True
    return ctx


def ingest_options(settings: DataSettings):
    """Execution options for `ray.train.DataConfig(execution_options=...)`.

    Ray Train replaces a dataset's own execution options with these on every shard, so the
    order and the object-store cap must travel this way: preserve_order, plus
    object_store_memory_limit when set; the rest is what Train would use anyway.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    if settings.object_store_memory_limit:
        options.resource_limits = options.resource_limits.copy(object_store_memory=settings.object_store_memory_limit)
    return options


# ---------------------------------------------------------------------------------------------
# driver pass


@dataclass
class Manifest:
    """What the driver pass kept for one split."""

    path: Path  # the jsonl Ray Data reads: one row per good record
    num_good: int
    num_bad: int
    quarantine_path: Path | None  # {split}.quarantine.jsonl (skip mode)


def write_manifest(settings: DataSettings, files: Sequence[str], split: str) -> Manifest:
    """Validate every jsonl with `validate_file`, then write the good records with their file and line.

    Ids must be unique across the split's files too (a repeat in a later file is a bad record).
    """
    skip = settings.on_bad_record == "skip"
    qdir = Path(settings.quarantine_dir) if settings.quarantine_dir else None
    work = Path(settings.work_dir or settings.quarantine_dir or _temp_work_dir())
    work.mkdir(parents=True, exist_ok=True)
    if qdir is not None:
        qdir.mkdir(parents=True, exist_ok=True)
        for stale in qdir.glob(f"{split}.decode-quarantine.*.jsonl"):  # from an earlier build of this split
            stale.unlink()

    rows: list[dict] = []
    quarantined: list[dict] = []
    seen: dict[str, tuple[str, int]] = {}
    for i, path in enumerate(files):
        path = str(path)
        part = (qdir or work) / f".{split}.{i}.quarantine.part"
        good, _ = validate_file(
            path, settings.images_root, settings.on_bad_record, quarantine_path=part if skip else None,
            max_images_per_turn=settings.max_images_per_turn,
        )
        bad = list(_read_jsonl(part)) if skip else []
        part.unlink(missing_ok=True)
        quarantined += bad
        bad_lines = {e["line"] for e in bad}
        texts = {line: text for line, text in iter_jsonl(path) if line not in bad_lines}
        if len(texts) != len(good):  # validate_file keeps good records in file order
            raise RuntimeError(f"{path}: {len(good)} good records but {len(texts)} unquarantined lines")
        for (line, text), rec in zip(texts.items(), good):
            if rec["id"] in seen:
                first = "%s:%d" % seen[rec["id"]]
                err = BadRecord(f"duplicate id (first seen at {first})", path=path, line=line, record_id=rec["id"])
                if not skip:
                    raise err
                quarantined.append({"file": path, "line": line, "id": rec["id"], "reason": err.reason, "raw": text})
                continue
            seen[rec["id"]] = (path, line)
            rows.append({"id": rec["id"], "_file": path, "_line": line, "record": json.dumps(rec, ensure_ascii=False)})

    qpath = None
    if skip:
        qpath = qdir / f"{split}.quarantine.jsonl"
        write_jsonl(qpath, quarantined)
        if quarantined:
            logger.warning("%s: %d bad record(s) skipped by validation, listed in %s", split, len(quarantined), qpath)
    if not rows:
        raise ValueError(f"{split}: no usable records in {list(files)}" + (f" (all {len(quarantined)} quarantined in {qpath})" if quarantined else ""))
    manifest = work / f"{split}.manifest.jsonl"
    write_jsonl(manifest, rows)
    return Manifest(manifest, len(rows), len(quarantined), qpath)


def _read_jsonl(path: Path) -> Iterator[dict]:
    if path.is_file():
        for _, text in iter_jsonl(path):
            yield json.loads(text)


def _temp_work_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="phi3v-data-")


# ---------------------------------------------------------------------------------------------
# the actor


class DecodeError(ValueError):
    """An image the actor cannot use: unreadable, truncated, not an image, or too many pixels."""


# What bad data raises while decoding and building an example (anything else is a bug and propagates).
DECODE_ERRORS = (DecodeError, SequenceTooLong, ValueError, OSError, SyntaxError, EOFError, Image.DecompressionBombError)


class Phi3VPreprocessor:
    """map_batches callable: manifest rows → model rows. Loads the processor once per actor."""

    def __init__(self, settings: DataSettings, split: str = "train"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.settings = settings
        self.split = split
        self.images_root = Path(settings.images_root)
        self.processor = Phi3VProcessor.from_pretrained(settings.processor_dir, num_crops=settings.num_crops)
        # PIL's own guard as a second line (it raises at 2× this); the size check below comes first.
        Image.MAX_IMAGE_PIXELS = settings.max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        self._quarantine_file = None

    def load_image(self, rel: str) -> Image.Image:
        """Open one image, refuse it above max_pixels before decoding, then decode it fully."""
        path = self.images_root / rel
        try:
            with Image.open(path) as im:
                width, height = im.size
                if width * height > self.settings.max_pixels:
                    raise DecodeError(
                        f"image {rel!r} is {width}×{height} = {width * height} pixels, over max_pixels "
                        f"{self.settings.max_pixels} (decompression bomb?)"
                    )
                im.load()  # a truncated file fails here
                return im.convert("RGB")
        except DecodeError:
            raise
        except Image.DecompressionBombError as e:
            raise DecodeError(f"image {rel!r} refused as a decompression bomb: {e}") from None
        except FileNotFoundError:
            raise DecodeError(f"image {rel!r} does not exist under {self.images_root}") from None
        except (OSError, SyntaxError, EOFError, ValueError) as e:  # UnidentifiedImageError is an OSError
            raise DecodeError(f"image {rel!r} cannot be decoded ({type(e).__name__}: {e})") from None

    def build_row(self, record: dict) -> dict:
        """One validated record → one row (see the module docstring for the columns)."""
        conversations = record["conversations"]
        images = [self.load_image(rel) for turn in conversations for rel in (turn.get("images") or [])]
        ex = build_example(
            self.processor, conversations, images, max_length=self.settings.max_length,
            overflow=self.settings.overflow, system=self.settings.system,
        )
        return {
            "id": record["id"],
            "input_ids": ex.input_ids,
            "labels": ex.labels,
            "pixel_values": ex.pixel_values.astype(np.float32, copy=False),
            "image_sizes": ex.image_sizes.astype(np.int64, copy=False),
            "num_images": ex.num_images,
            "num_tokens": int(ex.input_ids.shape[0]),
            # For evaluation: the task name (per-task scores) and every reference answer of the first
            # turn (DocVQA keeps several for ANLS), as a json list.
            "task": str(record.get("task") or record.get("source") or ""),
            "answers": json.dumps(record.get("answers") or [conversations[0]["assistant"]]),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray | list]:
        out: dict[str, list] = {k: [] for k in ROW_COLUMNS}
        for rid, file, line, text in zip(batch["id"], batch["_file"], batch["_line"], batch["record"]):
            rid, file, line = str(rid), str(file), int(line)
            try:
                row = self.build_row(json.loads(text))
            except DECODE_ERRORS as e:
                reason = f"{type(e).__name__}: {e}" if isinstance(e, SequenceTooLong) else str(e)
                if self.settings.on_bad_record == "fail":
                    raise BadRecord(reason, path=file, line=line, record_id=rid) from e
                self.quarantine({"file": file, "line": line, "id": rid, "reason": reason, "raw": str(text)})
                continue
            for k in ROW_COLUMNS:
                out[k].append(row[k])
        return {
            "id": np.asarray(out["id"], dtype=object),
            "input_ids": out["input_ids"],
            "labels": out["labels"],
            "pixel_values": out["pixel_values"],
            "image_sizes": out["image_sizes"],
            "num_images": np.asarray(out["num_images"], dtype=np.int64),
            "num_tokens": np.asarray(out["num_tokens"], dtype=np.int64),
            "task": np.asarray(out["task"], dtype=object),
            "answers": np.asarray(out["answers"], dtype=object),
        }

    def quarantine(self, entry: dict) -> None:
        """Append one bad record to this actor's own part file (no two writers share a file)."""
        if self._quarantine_file is None:
            qdir = Path(self.settings.quarantine_dir)
            qdir.mkdir(parents=True, exist_ok=True)
            path = qdir / f"{self.split}.decode-quarantine.{uuid.uuid4().hex}.jsonl"
            self._quarantine_file = open(path, "a", encoding="utf-8")
        self._quarantine_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._quarantine_file.flush()


# ---------------------------------------------------------------------------------------------
# the dataset


def map_batches_kwargs(settings: DataSettings, split: str = "train") -> dict:
    """Arguments of the preprocessing map_batches: actor pool, CPUs, node pinning, batch size."""
    c = settings.preprocess_concurrency
    compute = ActorPoolStrategy(min_size=c[0], max_size=c[1]) if isinstance(c, tuple) else ActorPoolStrategy(size=c)
    kwargs = dict(
        fn_constructor_kwargs={"settings": settings, "split": split},
        batch_size=settings.preprocess_batch_size,
        batch_format="numpy",
        compute=compute,
        num_cpus=settings.num_cpus_per_actor,
    )
    if settings.node_resource:
        kwargs["resources"] = {settings.node_resource: NODE_RESOURCE_AMOUNT}
    return kwargs


def build_dataset(
    settings: DataSettings, split_files: Sequence[str] | None = None, split: str = "train"
) -> ray.data.Dataset:
    """Validate the split on the driver, then read → decode + HD crops + tokenize, streaming.

    split_files defaults to settings.train_files (split "train") or settings.val_files (any
    other split). Also sets preserve_order on the current DataContext (see configure_data_context).
    """
    settings.validate()
    files = list(split_files) if split_files is not None else (settings.train_files if split == "train" else settings.val_files)
    if not files:
        raise ValueError(f"split {split!r}: no jsonl files given")
    manifest = write_manifest(settings, files, split)
    logger.info("%s: %d records (%d quarantined) → %s", split, manifest.num_good, manifest.num_bad, manifest.path)

    configure_data_context()
    resources = {settings.node_resource: NODE_RESOURCE_AMOUNT} if settings.node_resource else None
    # Enough blocks that several actors get work; one record is at most one preprocessing batch.
    num_blocks = max(1, min(math.ceil(manifest.num_good / settings.preprocess_batch_size), 1000))
    ds = ray.data.read_json(
        str(manifest.path), override_num_blocks=num_blocks, num_cpus=READ_NUM_CPUS, resources=resources
    )
    ds = ds.map_batches(Phi3VPreprocessor, **map_batches_kwargs(settings, split))
    if settings.object_store_memory_limit:
        limits = ds.context.execution_options.resource_limits
        ds.context.execution_options.resource_limits = limits.copy(object_store_memory=settings.object_store_memory_limit)
    return ds


def quarantine_report(quarantine_dir) -> dict[str, int]:
    """Bad records per split and stage: {"train.validate": n, "train.decode": m, ...}.

    Decode entries are counted once per (file, line, id, reason): every epoch decodes again and
    appends again, and a retried task may repeat an entry.
    """
    qdir = Path(quarantine_dir)
    report: dict[str, int] = {}
    for path in sorted(qdir.glob("*.quarantine.jsonl")):
        report[f"{path.name[: -len('.quarantine.jsonl')]}.validate"] = sum(1 for _ in iter_jsonl(path))
    decode: dict[str, set] = {}
    for path in sorted(qdir.glob("*.decode-quarantine.*.jsonl")):
        split = path.name.split(".decode-quarantine.")[0]
        keys = decode.setdefault(split, set())
        for e in _read_jsonl(path):
            keys.add((e.get("file"), e.get("line"), e.get("id"), e.get("reason")))
    for split, keys in sorted(decode.items()):
        report[f"{split}.decode"] = len(keys)
    return report


def read_quarantine(quarantine_dir, split: str = "train", stage: str = "decode") -> list[dict]:
    """The quarantined entries of one split and stage ("validate" or "decode"), deduplicated."""
    qdir = Path(quarantine_dir)
    paths = [qdir / f"{split}.quarantine.jsonl"] if stage == "validate" else sorted(qdir.glob(f"{split}.decode-quarantine.*.jsonl"))
    entries, seen = [], set()
    for path in paths:
        for e in _read_jsonl(path):
            key = (e.get("file"), e.get("line"), e.get("id"), e.get("reason"))
            if key not in seen:
                seen.add(key)
                entries.append(e)
    return entries


# ---------------------------------------------------------------------------------------------
# the training side


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict]:
    """A numpy batch (columns) → its rows. Ragged columns arrive as object arrays of arrays."""
    n = len(batch["input_ids"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


class Phi3VCollateFn(NumpyBatchCollateFn):
    """Numpy batch → padded torch batch via `phi3v_ray.collate.collate` (for iter_torch_batches too).

    A batch without images has pixel_values and image_sizes None, as collate returns them; with
    return_ids the batch also carries "ids" (list of str), for logging and tests.
    """

    def __init__(self, padding_side: str = "right", pad_to_multiple_of: int | None = None, return_ids: bool = False):
        super().__init__()
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_ids = return_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        rows = batch_rows(batch)
        out = collate(rows, padding_side=self.padding_side, pad_to_multiple_of=self.pad_to_multiple_of)
        if self.return_ids:
            out["ids"] = [str(r["id"]) for r in rows]
        return out


def iter_train_batches(
    data,
    micro_batch: int,
    epoch: int,
    seed: int,
    shuffle_buffer: int | None = 64,
    skip_batches: int = 0,
    *,
    drop_last: bool = False,
    prefetch_batches: int = 1,
    collate_fn: Phi3VCollateFn | None = None,
) -> Iterator[dict]:
    """Collated CPU torch batches of one epoch from a Dataset or a worker's shard (DataIterator).

    The order depends only on (data, seed + epoch, shuffle_buffer, micro_batch): the pipeline
    preserves order and the local shuffle buffer is seeded. skip_batches drops the first k
    batches without collating them, so a run resumed mid-epoch continues where it stopped.
    shuffle_buffer None or 0 keeps file order.
    """
    collate_fn = collate_fn or Phi3VCollateFn()
    batches = data.iter_batches(
        batch_size=micro_batch,
        batch_format="numpy",
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=(seed + epoch) if shuffle_buffer else None,
    )
    for i, batch in enumerate(batches):
        if i < skip_batches:
            continue
        yield collate_fn(batch)
