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
(the record travels as one JSON string, so records with different extra fields read alike). On a
multi-node cluster work_dir and quarantine_dir must be on storage every node sees.

Order is deterministic (`preserve_order`), so a restarted run sees the same rows in the same
order: `phi3v_ray.collate.iter_train_batches` shuffles with a local buffer seeded by seed + epoch
and skips the batches a resumed run has already trained on.

CPU rule (STACK_NOTES): Ray Data gets only the CPUs that training workers leave. With
`ray.init(num_cpus=2)` and two 1-CPU workers nothing is left and the first read waits forever.
Preprocessing actors ask for a fraction of a CPU (0.5 by default), read tasks for 0.25; size the
cluster with `recommended_ray_init_cpus` and check it on the driver with `check_cpu_budget`.
The actor pool follows the trainers (`DataConfig.actor_pool`): by default one actor per training
worker, autoscaling to two per worker; a busy actor uses one core whatever its logical share.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from PIL import Image, ImageFile
from ray.data import ActorPoolStrategy, DataContext

from phi3v_ray.config import ConfigError, DataConfig, Problem
from phi3v_ray.examples import SequenceTooLong, build_example
from phi3v_ray.processor import Phi3VProcessor

from .schema import BadRecord, iter_jsonl, validate_file, write_jsonl

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
    if not (Path(paths.processor_dir) / "tokenizer.json").is_file():
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


# ---------------------------------------------------------------------------------------------
# driver pass


@dataclass
class Manifest:
    """What the driver pass kept for one split."""

    path: Path  # the jsonl Ray Data reads: one row per good record
    num_good: int
    num_bad: int
    quarantine_path: Path | None  # {split}.quarantine.jsonl (skip mode)


def write_manifest(data: DataConfig, paths: DataPaths, files: Sequence[str], split: str) -> Manifest:
    """Validate every jsonl with `validate_file`, then write the good records with their file and line.

    Ids must be unique across the split's files too (a repeat in a later file is a bad record).
    """
    skip = data.on_bad_record == "skip"
    qdir = Path(paths.quarantine_dir) if paths.quarantine_dir else None
    work = Path(paths.work_dir or paths.quarantine_dir or _temp_work_dir())
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
            path, data.images_root, data.on_bad_record, quarantine_path=part if skip else None,
            max_images_per_turn=data.max_images_per_turn,
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

    def __init__(self, data: DataConfig, paths: DataPaths, split: str = "train"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.data = data
        self.paths = paths
        self.split = split
        self.images_root = Path(data.images_root)
        self.processor = Phi3VProcessor.from_pretrained(paths.processor_dir, num_crops=data.num_crops)
        # PIL's own guard as a second line (it raises at 2× this); the size check below comes first.
        Image.MAX_IMAGE_PIXELS = data.max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        self._quarantine_file = None

    def load_image(self, rel: str) -> Image.Image:
        """Open one image, refuse it above max_pixels before decoding, then decode it fully."""
        path = self.images_root / rel
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

    def build_row(self, record: dict) -> dict:
        """One validated record → one row (see the module docstring for the columns)."""
        conversations = record["conversations"]
        images = [self.load_image(rel) for turn in conversations for rel in (turn.get("images") or [])]
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
        for rid, file, line, text in zip(batch["id"], batch["_file"], batch["_line"], batch["record"]):
            rid, file, line = str(rid), str(file), int(line)
            try:
                row = self.build_row(json.loads(text))
            except DECODE_ERRORS as e:
                reason = f"{type(e).__name__}: {e}" if isinstance(e, SequenceTooLong) else str(e)
                if self.data.on_bad_record == "fail":
                    raise BadRecord(reason, path=file, line=line, record_id=rid) from e
                self.quarantine({"file": file, "line": line, "id": rid, "reason": reason, "raw": str(text)})
                continue
            for k in columns:
                out[k].append(row[k])
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
        """Append one bad record to this actor's own part file (no two writers share a file)."""
        if self._quarantine_file is None:
            qdir = Path(self.paths.quarantine_dir)
            qdir.mkdir(parents=True, exist_ok=True)
            path = qdir / f"{self.split}.decode-quarantine.{uuid.uuid4().hex}.jsonl"
            self._quarantine_file = open(path, "a", encoding="utf-8")
        self._quarantine_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._quarantine_file.flush()


# ---------------------------------------------------------------------------------------------
# the dataset


def map_batches_kwargs(data: DataConfig, paths: DataPaths, split: str = "train", num_workers: int = 1) -> dict:
    """Arguments of the preprocessing map_batches: actor pool, CPUs, node pinning, batch size."""
    low, high = data.actor_pool(num_workers, split)
    compute = ActorPoolStrategy(min_size=low, max_size=high) if high > low else ActorPoolStrategy(size=low)
    kwargs = dict(
        fn_constructor_kwargs={"data": data, "paths": paths, "split": split},
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
    ds = ray.data.read_json(
        str(manifest.path), override_num_blocks=num_blocks, num_cpus=READ_NUM_CPUS, resources=resources
    )
    ds = ds.map_batches(Phi3VPreprocessor, **map_batches_kwargs(data, paths, split, num_workers))
    if data.object_store_memory_limit:
        limits = ds.context.execution_options.resource_limits
        ds.context.execution_options.resource_limits = limits.copy(object_store_memory=data.object_store_memory_limit)
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

