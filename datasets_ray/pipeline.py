"""The Ray Data pipeline: jsonl records → validated → decoded, HD-cropped, tokenized numpy rows.

    driver: validate_file per jsonl ──▶ {work_dir}/{split}.manifest.jsonl (id, _file, _line, record)
    Ray Data: read_json(manifest) ──▶ map_batches(Phi3VPreprocessor) ──▶ rows
    training worker (phi3v_ray.collate): iter_train_batches(shard, ...) ──▶ padded torch batches

Inputs: the run's `DataConfig` (`TrainConfig.data`, phi3v_ray.config: files, crops, lengths,
bad-record policy, actors) and a `DataPaths` (tokenizer directory, quarantine and work dirs).

Rows (one per record; image counts and lengths differ from row to row, Ray Data carries the
ragged columns as variable-shaped tensors):

    id            str
    input_ids     int64 (T,)            −k at image k's placeholder positions
    labels        int64 (T,)            −100 except on answer tokens
    pixel_crops   uint8 (Σ h·w, 3, 336, 336)  the HD crops of every image, no global view, no padding
                  (pixel_format "uint8", the default; the training worker makes pixel_values on its
                  device: phi3v_ray.collate.to_device), or instead
    pixel_values  float32 (n_img, num_crops+1, 3, 336, 336)   (pixel_format "float32": 4× the bytes)
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
(the record travels as one JSON string, so records with different extra fields read alike).

Any path may be local or on object storage (s3://, gs://, abfs://; see phi3v_ray.storage):
the jsonl files, images_root, the tokenizer's checkpoint, and the run's work_dir and quarantine_dir
(`phi3v_ray.launch` puts both under storage_path/name/, which every node sees). Ray Data reads the
manifest on the nodes, and each actor fetches its records' image bytes itself (a batch's images
in parallel), so the driver never holds an image. A missing object is then a decode-stage bad
record ("does not exist under s3://…"); credentials that may not read raise StorageAccessDenied
at once, whatever on_bad_record says (it is the cluster's problem, not the record's).

Sharded Parquet (`phi3v-ray convert … --format parquet`, datasets_ray/shards.py): a train_file
that is a directory of `*.parquet` shards, or one shard, holds the records with their image bytes
embedded, one row each. The driver pass reads only the id, row and record columns; Ray Data reads
the shards with read_parquet and the actors decode the embedded bytes (no per-image requests).

Order is deterministic (`preserve_order`), so a restarted run sees the same rows in the same
order: `phi3v_ray.collate.iter_train_batches` shuffles with a buffer of rows seeded by (seed, epoch,
rank) and skips the batches a resumed run has already trained on.

CPU rule (STACK_NOTES): Ray Data gets only the CPUs that training workers leave. With
`ray.init(num_cpus=2)` and two 1-CPU workers nothing is left and the first read waits forever.
Preprocessing actors ask for a fraction of a CPU (0.5 by default), read tasks for 0.25; size the
cluster with `recommended_ray_init_cpus` and check it on the driver with `check_cpu_budget`.
The actor pool follows the trainers (`DataConfig.actor_pool`): by default one actor per training
worker, autoscaling to two per worker; a busy actor uses one core whatever its logical share.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from PIL import Image, ImageFile
from ray.data import ActorPoolStrategy, DataContext

from phi3v_ray.config import ConfigError, DataConfig, Problem
from phi3v_ray.examples import SequenceTooLong, build_example
from phi3v_ray.processor import Phi3VProcessor
from phi3v_ray.storage import (
    StorageAccessDenied, delete_file, filesystem, is_file, is_remote, join, list_names, read_bytes, read_text, write_text,
)

from .schema import BadRecord, iter_jsonl, validate_lines, write_jsonl
from .shards import SHARD_COLUMNS, is_parquet_input, list_shards, read_shard_records

logger = logging.getLogger(__name__)

READ_NUM_CPUS = 0.25  # reading the manifest is light; a whole CPU per read task would starve training
NODE_RESOURCE_AMOUNT = 0.001  # a sliver of the custom resource: pins actors to marked nodes, caps nothing
ROW_COLUMNS = ("id", "input_ids", "labels", "pixel_crops", "image_sizes", "num_images", "num_tokens", "task", "answers")
PIXEL_COLUMN = {"uint8": "pixel_crops", "float32": "pixel_values"}  # by DataConfig.pixel_format
MANIFEST_COLUMNS = ("id", "_file", "_line", "record")


@dataclass(frozen=True)
class DataPaths:
    """What one run adds to its `DataConfig`: where the tokenizer is and where the pipeline writes.

    Built once per run (`phi3v_ray.launch.build_datasets`). On a multi-node cluster both
    directories must be on storage every node sees.
    """

    processor_dir: str  # checkpoint directory holding tokenizer.json (and preprocessor_config.json)
    quarantine_dir: str = ""  # skipped records, required for on_bad_record="skip"; a build clears its split's old entries
    work_dir: str = ""  # the manifests; default quarantine_dir, else a temporary directory

    def __post_init__(self) -> None:
        for name in ("processor_dir", "quarantine_dir", "work_dir"):
            object.__setattr__(self, name, str(getattr(self, name) or ""))


def check_inputs(data: DataConfig, paths: DataPaths, files: Sequence[str]) -> None:
    """Raise one ConfigError for everything the pipeline cannot start with: settings, files, tokenizer."""
    problems = data.value_problems() + data.path_problems(files)
    if not is_file(join(paths.processor_dir, "tokenizer.json")):
        problems.append(Problem("processor_dir", paths.processor_dir,
                                "set it to a checkpoint directory that holds tokenizer.json"))
    if data.on_bad_record == "skip" and not paths.quarantine_dir:
        problems.append(Problem("quarantine_dir", paths.quarantine_dir,
                                "set a directory: on_bad_record='skip' writes every skipped record there"))
    if problems:
        raise ConfigError(problems, what="data pipeline input")


# ---------------------------------------------------------------------------------------------
# resources


def row_columns(data: DataConfig) -> tuple[str, ...]:
    """The columns of a row: ROW_COLUMNS with the pixel column of data.pixel_format."""
    return tuple(PIXEL_COLUMN[data.pixel_format] if c == "pixel_crops" else c for c in ROW_COLUMNS)


def preprocess_cpus(data: DataConfig, num_workers: int = 1) -> float:
    """Logical CPUs Ray Data holds at its peak: every preprocessing actor plus one read task."""
    return data.actor_pool(num_workers)[1] * data.preprocess_cpus + READ_NUM_CPUS


def recommended_ray_init_cpus(num_workers: int, cpus_per_worker: float, data: DataConfig) -> int:
    """Logical CPUs for `ray.init(num_cpus=...)` so training workers and Ray Data both fit.

    Ray Data only sees what the workers leave; when that is less than one read task plus one
    actor the dataset waits forever. Logical CPUs may exceed the cores (2 cores → num_cpus=4 here).
    """
    return math.ceil(num_workers * cpus_per_worker + preprocess_cpus(data, num_workers))


def check_cpu_budget(cluster_cpus: float, num_workers: int, cpus_per_worker: float, data: DataConfig) -> None:
    """Raise ConfigError on the driver if the training workers would leave Ray Data too few CPUs to start."""
    left = cluster_cpus - num_workers * cpus_per_worker
    actors = data.actor_pool(num_workers)[0]
    need = actors * data.preprocess_cpus + READ_NUM_CPUS
    if left < need:
        enough = recommended_ray_init_cpus(num_workers, cpus_per_worker, data)
        raise ConfigError([Problem(
            "cpus_per_worker", cpus_per_worker,
            f"{num_workers} training workers × {cpus_per_worker:g} CPUs leave Ray Data {max(left, 0):g} of the "
            f"cluster's {cluster_cpus:g} CPUs, but it needs at least {need:g} ({actors} preprocessing actor(s) at "
            f"preprocess_cpus={data.preprocess_cpus:g} + a read task at {READ_NUM_CPUS:g}); the dataset would wait "
            f"forever. Fix: a cluster of {enough} CPUs (locally ray.init(num_cpus={enough})), fewer CPUs per "
            "worker, fewer preprocess_actors, or a smaller preprocess_cpus",
        )], what="training config for this cluster")


def configure_data_context(ctx: DataContext | None = None) -> DataContext:
    """Deterministic order for exact resume. Default: the current context.

    Ray Train copies the driver's current DataContext when the trainer is built and applies its
    execution options to every shard, so this must run on the driver before the trainer exists
    (`build_dataset` does it).
    """
    ctx = ctx or DataContext.get_current()
    ctx.execution_options.preserve_order = True
    return ctx


FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
SHARDS_PER_FOOTER_ACTOR = 64  # a footer is a few KB: one actor's thread pool reads dozens at once
RAY_FOOTER_ACTORS = 32  # Ray Data's own default, and the most we ask for


@contextmanager
def footer_readers(shards: Sequence[str]) -> Iterator[int]:
    """While `read_parquet` is called: one footer-reading actor per 64 shards (at most 32), not 32 always.

    Ray Data's Parquet reader (2.60) reads every shard's footer on a pool of actors, 32 by default, made
    afresh each time the dataset runs, which for a split evaluated during training is every evaluation on
    every worker. Each actor needs a CPU to be placed, and training holds most of them: measured on the
    four-raylet test cluster, an evaluation of 4 records on 2 Parquet shards waited 60-87 s for its
    footers, and then starts in seconds with one actor. The reader takes the count from the environment
    when `read_parquet` builds the plan, so it is set just around that call (and a user's own setting
    wins). Its module also reads it once at import as its default: a process whose first Parquet read is
    this one keeps the smaller pool for later reads too, which only ever come from here.
    """
    if FOOTER_ACTORS_ENV in os.environ:
        yield int(os.environ[FOOTER_ACTORS_ENV])
        return
    wanted = min(RAY_FOOTER_ACTORS, max(1, math.ceil(len(shards) / SHARDS_PER_FOOTER_ACTOR)))
    os.environ[FOOTER_ACTORS_ENV] = str(wanted)
    try:
        yield wanted
    finally:
        os.environ.pop(FOOTER_ACTORS_ENV, None)


# ---------------------------------------------------------------------------------------------
# driver pass


@dataclass
class Manifest:
    """What the driver pass kept for one split."""

    path: Path | str  # the jsonl of good records (a URI on object storage)
    num_good: int
    num_bad: int
    quarantine_path: Path | str | None  # {split}.quarantine.jsonl (skip mode)
    parquet: "ParquetInput | None" = None  # the split is sharded Parquet: Ray Data reads these shards


@dataclass(frozen=True)
class ParquetInput:
    """What the actors need to read a split's Parquet shards: the shards, and the rows the driver refused."""

    shards: tuple[str, ...]  # as the user named them (URIs keep their scheme)
    inner: tuple[str, ...]  # the same shards as paths inside their filesystem (what Ray Data's "path" column holds)
    skip: frozenset = frozenset()  # (inner path, row) of every bad row


def write_manifest(data: DataConfig, paths: DataPaths, files: Sequence[str], split: str) -> Manifest:
    """Validate every jsonl (or Parquet shard), then write the good records with their file and line.

    Ids must be unique across the split's files too (a repeat in a later file is a bad record).
    Every file goes to work_dir / quarantine_dir whole (a temporary name then a rename locally, one
    upload on object storage): a failed run leaves no half-written manifest or quarantine.
    """
    skip = data.on_bad_record == "skip"
    qdir = paths.quarantine_dir or None
    work = paths.work_dir or paths.quarantine_dir or _temp_work_dir()
    if qdir is not None:
        for name in list_names(qdir):  # decode entries from an earlier build of this split
            if name.startswith(f"{split}.decode-quarantine."):
                delete_file(join(qdir, name))

    parquet = all(is_parquet_input(str(f)) for f in files) and bool(files)
    sources = [(shard, read_shard_records(shard)) for f in files for shard in list_shards(str(f))] if parquet else \
        [(str(f), list(iter_jsonl(str(f)))) for f in files]
    rows: list[dict] = []
    quarantined: list[dict] = []
    refused: set[tuple[str, int]] = set()
    seen: dict[str, tuple[str, int]] = {}
    for path, lines in sources:
        good, bad = validate_lines(lines, path, None if parquet else data.images_root, data.on_bad_record,
                                   max_images_per_turn=data.max_images_per_turn)
        quarantined += bad
        refused.update((path, e["line"]) for e in bad)
        for line, text, rec in good:
            if rec["id"] in seen:
                first = "%s:%d" % seen[rec["id"]]
                err = BadRecord(f"duplicate id (first seen at {first})", path=path, line=line, record_id=rec["id"])
                if not skip:
                    raise err
                quarantined.append({"file": path, "line": line, "id": rec["id"], "reason": err.reason, "raw": text})
                refused.add((path, line))
                continue
            seen[rec["id"]] = (path, line)
            rows.append({"id": rec["id"], "_file": path, "_line": line, "record": json.dumps(rec, ensure_ascii=False)})

    qpath = None
    if skip:
        qpath = _local_or_uri(join(qdir, f"{split}.quarantine.jsonl"))
        write_jsonl(qpath, quarantined)
        if quarantined:
            logger.warning("%s: %d bad record(s) skipped by validation, listed in %s", split, len(quarantined), qpath)
    if not rows:
        raise ValueError(f"{split}: no usable records in {list(files)}" + (f" (all {len(quarantined)} quarantined in {qpath})" if quarantined else ""))
    manifest = _local_or_uri(join(work, f"{split}.manifest.jsonl"))
    write_jsonl(manifest, rows)
    plan = None
    if parquet:
        inner = {p: filesystem(p)[1] for p, _ in sources}
        plan = ParquetInput(tuple(inner), tuple(inner.values()), frozenset((inner[p], line) for p, line in refused))
    return Manifest(manifest, len(rows), len(quarantined), qpath, plan)


def manifest_count(path) -> int:
    """Records in a written manifest (local or on object storage)."""
    text = read_text(str(path)) or ""
    return sum(1 for line in text.splitlines() if line.strip())


def _local_or_uri(path: str) -> Path | str:
    return path if is_remote(path) else Path(path)


def _read_jsonl(path) -> Iterator[dict]:
    text = read_text(str(path))
    for line in (text or "").splitlines():
        if line.strip():
            yield json.loads(line)


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

    def __init__(self, data: DataConfig, paths: DataPaths, split: str = "train", parquet: ParquetInput | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.data = data
        self.paths = paths
        self.split = split
        self.parquet = parquet
        self.remote = bool(data.images_root) and is_remote(data.images_root) and parquet is None
        self.images_root = data.images_root if self.remote else Path(data.images_root)
        if self.remote:  # resolved once: resolving a URI is a request
            self._fs, self._root = filesystem(data.images_root)
        self.processor = Phi3VProcessor.from_pretrained(paths.processor_dir, num_crops=data.num_crops)
        # PIL's own guard as a second line (it raises at 2× this); the size check below comes first.
        Image.MAX_IMAGE_PIXELS = data.max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        self._quarantine_path = None
        self._quarantined: list[str] = []
        self._dirty = False

    def fetch(self, rel: str) -> bytes:
        """One image's bytes from object storage; a missing object is a DecodeError, denied access is not."""
        try:
            return read_bytes(f"{self.images_root}/{rel}", self._fs, f"{self._root}/{rel}")
        except FileNotFoundError:
            raise DecodeError(f"image {rel!r} does not exist under {self.images_root}") from None

    def prefetch(self, records: list[dict]) -> dict[str, bytes | DecodeError]:
        """Every image of a batch's records, fetched in parallel (object storage answers in tens of ms each)."""
        from concurrent.futures import ThreadPoolExecutor

        rels = sorted({rel for rec in records for turn in rec["conversations"] for rel in (turn.get("images") or [])})

        def get(rel):
            try:
                return self.fetch(rel)
            except DecodeError as e:
                return e

        with ThreadPoolExecutor(max_workers=min(16, max(1, len(rels)))) as pool:
            return dict(zip(rels, pool.map(get, rels)))

    def load_image(self, rel: str, content: bytes | DecodeError | None = None) -> Image.Image:
        """Open one image (a file under images_root, or its bytes), refuse it above max_pixels before
        decoding, then decode it fully."""
        if isinstance(content, DecodeError):
            raise content
        if content is None and self.remote:
            content = self.fetch(rel)
        path = io.BytesIO(content) if content is not None else self.images_root / rel
        try:
            with Image.open(path) as im:
                width, height = im.size
                if width * height > self.data.max_pixels:
                    raise DecodeError(
                        f"image {rel!r} is {width}×{height} = {width * height} pixels, over max_pixels "
                        f"{self.data.max_pixels} (decompression bomb?)"
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

    def build_row(self, record: dict, contents=None) -> dict:
        """One validated record → one row (see the module docstring for the columns).

        contents: the images' bytes, a {rel: bytes} map (prefetched) or a list in record order
        (embedded in a Parquet row); None reads files under images_root.
        """
        conversations = record["conversations"]
        rels = [rel for turn in conversations for rel in (turn.get("images") or [])]
        if isinstance(contents, (list, tuple)):
            if len(contents) != len(rels):
                raise DecodeError(f"the row embeds {len(contents)} image(s), its record names {len(rels)}")
            images = [self.load_image(rel, bytes(b)) for rel, b in zip(rels, contents)]
        else:
            images = [self.load_image(rel, (contents or {}).get(rel)) for rel in rels]
        crops = self.data.pixel_format == "uint8"
        ex = build_example(
            self.processor, conversations, images, max_length=self.data.max_length,
            overflow=self.data.overflow, system=self.data.system or None, crops=crops,
        )
        pixels = {"pixel_crops": ex.pixel_crops} if crops else {"pixel_values": ex.pixel_values.astype(np.float32, copy=False)}
        return {
            "id": record["id"],
            "input_ids": ex.input_ids,
            "labels": ex.labels,
            **pixels,
            "image_sizes": ex.image_sizes.astype(np.int64, copy=False),
            "num_images": ex.num_images,
            "num_tokens": int(ex.input_ids.shape[0]),
            # For evaluation: the task name (per-task scores) and every reference answer of the first
            # turn (DocVQA keeps several for ANLS), as a json list.
            "task": str(record.get("task") or record.get("source") or ""),
            "answers": json.dumps(record.get("answers") or [conversations[0]["assistant"]]),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray | list]:
        columns = row_columns(self.data)
        out: dict[str, list] = {k: [] for k in columns}
        if self.parquet is not None:  # a batch of shard rows: skip what the driver refused, images are embedded
            keep = [i for i, (p, r) in enumerate(zip(batch["path"], batch["row"])) if (str(p), int(r)) not in self.parquet.skip]
            names = dict(zip(self.parquet.inner, self.parquet.shards))
            files = [names.get(str(batch["path"][i]), str(batch["path"][i])) for i in keep]
            lines = [batch["row"][i] for i in keep]
            texts = [batch["record"][i] for i in keep]
            ids = [batch["id"][i] for i in keep]
            embedded = [list(batch["images"][i]) for i in keep]
            records = [None] * len(keep)
        else:
            ids, files, lines, texts = batch["id"], batch["_file"], batch["_line"], batch["record"]
            records = [json.loads(t) for t in texts]
            fetched = self.prefetch(records) if self.remote else None
            embedded = [fetched] * len(records)
        for rid, file, line, text, rec, contents in zip(ids, files, lines, texts, records, embedded):
            rid, file, line = str(rid), str(file), int(line)
            try:
                row = self.build_row(rec if rec is not None else json.loads(text), contents)
            except StorageAccessDenied:
                raise  # the cluster's credentials, not the record: never quarantined
            except DECODE_ERRORS as e:
                reason = f"{type(e).__name__}: {e}" if isinstance(e, SequenceTooLong) else str(e)
                if self.data.on_bad_record == "fail":
                    raise BadRecord(reason, path=file, line=line, record_id=rid) from e
                self.quarantine({"file": file, "line": line, "id": rid, "reason": reason, "raw": str(text)})
                continue
            for k in columns:
                out[k].append(row[k])
        self._flush_quarantine()
        pixels = PIXEL_COLUMN[self.data.pixel_format]
        return {
            "id": np.asarray(out["id"], dtype=object),
            "input_ids": out["input_ids"],
            "labels": out["labels"],
            pixels: out[pixels],
            "image_sizes": out["image_sizes"],
            "num_images": np.asarray(out["num_images"], dtype=np.int64),
            "num_tokens": np.asarray(out["num_tokens"], dtype=np.int64),
            "task": np.asarray(out["task"], dtype=object),
            "answers": np.asarray(out["answers"], dtype=object),
        }

    def quarantine(self, entry: dict) -> None:
        """Note one bad record for this actor's own part file (no two writers share a file)."""
        if self._quarantine_path is None:
            self._quarantine_path = join(self.paths.quarantine_dir, f"{self.split}.decode-quarantine.{uuid.uuid4().hex}.jsonl")
        self._quarantined.append(json.dumps(entry, ensure_ascii=False) + "\n")
        self._dirty = True

    def _flush_quarantine(self) -> None:
        """Rewrite the part file whole after a batch that added entries (a rename, or one upload: never half a line)."""
        if self._dirty:
            write_text(self._quarantine_path, "".join(self._quarantined))
            self._dirty = False


# ---------------------------------------------------------------------------------------------
# the dataset


def map_batches_kwargs(data: DataConfig, paths: DataPaths, split: str = "train", num_workers: int = 1,
                       parquet: ParquetInput | None = None) -> dict:
    """Arguments of the preprocessing map_batches: actor pool, CPUs, node pinning, batch size."""
    low, high = data.actor_pool(num_workers, split)
    compute = ActorPoolStrategy(min_size=low, max_size=high) if high > low else ActorPoolStrategy(size=low)
    constructor = {"data": data, "paths": paths, "split": split}
    if parquet is not None:
        constructor["parquet"] = parquet
    kwargs = dict(
        fn_constructor_kwargs=constructor,
        batch_size=data.preprocess_batch_size,
        batch_format="numpy",
        compute=compute,
        num_cpus=data.preprocess_cpus,
    )
    if data.data_node_resource:
        kwargs["resources"] = {data.data_node_resource: NODE_RESOURCE_AMOUNT}
    return kwargs


def build_dataset(
    data: DataConfig, paths: DataPaths, files: Sequence[str] | None = None, split: str = "train",
    num_workers: int = 1,
) -> ray.data.Dataset:
    """Validate the split on the driver, then read → decode + HD crops + tokenize, streaming.

    files defaults to data.train_file (split "train") or data.val_file (any other split). Also
    sets preserve_order on the current DataContext (see configure_data_context). num_workers (the
    training workers the dataset feeds) sizes an auto actor pool.
    """
    if files is None:
        default = data.train_file if split == "train" else data.val_file
        files = [default] if default else []
    files = [str(f) for f in files]
    check_inputs(data, paths, files)
    manifest = write_manifest(data, paths, files, split)
    logger.info("%s: %d records (%d quarantined) → %s", split, manifest.num_good, manifest.num_bad, manifest.path)

    configure_data_context()
    resources = {data.data_node_resource: NODE_RESOURCE_AMOUNT} if data.data_node_resource else None
    # Enough blocks that several actors get work; one record is at most one preprocessing batch.
    num_blocks = max(1, min(math.ceil(manifest.num_good / data.preprocess_batch_size), 1000))
    if manifest.parquet is not None:
        shards = list(manifest.parquet.shards)
        with footer_readers(shards):
            ds = ray.data.read_parquet(
                shards, columns=list(SHARD_COLUMNS), include_paths=True,
                num_cpus=READ_NUM_CPUS, ray_remote_args={"resources": resources} if resources else None,
            )
        # A shard reads as one big block; cut it (streaming) into blocks of one preprocessing batch so that
        # every actor gets work and rows leave an actor batch by batch, as with the jsonl manifest.
        ds = ds.repartition(target_num_rows_per_block=data.preprocess_batch_size)
    else:
        ds = ray.data.read_json(
            str(manifest.path), override_num_blocks=num_blocks, num_cpus=READ_NUM_CPUS, resources=resources
        )
    ds = ds.map_batches(Phi3VPreprocessor, **map_batches_kwargs(data, paths, split, num_workers, manifest.parquet))
    if data.object_store_memory_limit:
        limits = ds.context.execution_options.resource_limits
        ds.context.execution_options.resource_limits = limits.copy(object_store_memory=data.object_store_memory_limit)
    return ds


def quarantine_report(quarantine_dir) -> dict[str, int]:
    """Bad records per split and stage: {"train.validate": n, "train.decode": m, ...} (any filesystem).

    Decode entries are counted once per (file, line, id, reason): every epoch decodes again and
    appends again, and a retried task may repeat an entry.
    """
    qdir = str(quarantine_dir)
    names = list_names(qdir)
    report: dict[str, int] = {}
    for name in names:
        if name.endswith(".quarantine.jsonl") and ".decode-quarantine." not in name:
            report[f"{name[: -len('.quarantine.jsonl')]}.validate"] = sum(1 for _ in _read_jsonl(join(qdir, name)))
    decode: dict[str, set] = {}
    for name in names:
        if ".decode-quarantine." in name and name.endswith(".jsonl"):
            keys = decode.setdefault(name.split(".decode-quarantine.")[0], set())
            for e in _read_jsonl(join(qdir, name)):
                keys.add((e.get("file"), e.get("line"), e.get("id"), e.get("reason")))
    for split, keys in sorted(decode.items()):
        report[f"{split}.decode"] = len(keys)
    return report


def read_quarantine(quarantine_dir, split: str = "train", stage: str = "decode") -> list[dict]:
    """The quarantined entries of one split and stage ("validate" or "decode"), deduplicated."""
    qdir = str(quarantine_dir)
    if stage == "validate":
        paths = [join(qdir, f"{split}.quarantine.jsonl")]
    else:
        paths = [join(qdir, n) for n in list_names(qdir) if n.startswith(f"{split}.decode-quarantine.") and n.endswith(".jsonl")]
    entries, seen = [], set()
    for path in paths:
        for e in _read_jsonl(path):
            key = (e.get("file"), e.get("line"), e.get("id"), e.get("reason"))
            if key not in seen:
                seen.add(key)
                entries.append(e)
    return entries
