"""The Ray Data pipeline on a real local Ray: rows match the processor, ragged rows travel, order is
deterministic, streaming stays inside a small object store, training workers and preprocessing
share the CPUs without a hang, and every bad record is either an error naming it or a quarantine
entry that is counted.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from datasets_ray.demo import N_FRAMES
from datasets_ray.pipeline import (
    MANIFEST_COLUMNS,
    DataPaths,
    Phi3VPreprocessor,
    build_dataset,
    check_cpu_budget,
    map_batches_kwargs,
    quarantine_report,
    read_quarantine,
    recommended_ray_init_cpus,
    write_manifest,
)
from datasets_ray.schema import BadRecord, write_jsonl
from phi3v_ray.collate import Phi3VCollate, collate, iter_train_batches
from phi3v_ray.config import ConfigError, DataConfig
from phi3v_ray.examples import build_example
from phi3v_ray.processor import Phi3VProcessor, pixel_values_from_crops

NUM_CROPS = 1  # the tiny checkpoint's budget: (n_img, 2, 3, 336, 336) per row keeps tests light
MAX_PIXELS = 200 * 200  # demo images are 96×96 and 96×64; the "bomb" is 400×400
MAX_LENGTH = 3000  # a 4-frame demo record is ~1280 tokens at 1 crop


def record(rid: str, images: list[str], answer: str = "red", user: str = "What colour is the shape?") -> dict:
    return {"id": rid, "source": "test", "conversations": [{"images": images, "user": user, "assistant": answer}]}


@pytest.fixture(scope="module")
def pipe_root(demo_data, tmp_path_factory) -> Path:
    """A private copy of the demo train split plus broken image files under images/bad/."""
    root = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(demo_data / "images" / "train", root / "images" / "train")
    shutil.copy(demo_data / "train.jsonl", root / "demo.jsonl")
    bad = root / "images" / "bad"
    bad.mkdir()
    png = (root / "images" / "train" / "demo-train-00000.0.png").read_bytes()
    (bad / "a.png").write_bytes(png[: len(png) // 2])  # truncated
    (bad / "b.png").write_text("this is a text file, not an image\n")  # renamed text
    Image.new("RGB", (400, 400), "white").save(bad / "c.png")  # 160k pixels > MAX_PIXELS
    return root


@pytest.fixture(scope="module", autouse=True)
def _drop_cached_runs():
    """The shared runs below hold datasets (and object-store blocks); let them go with the module."""
    yield
    _NINE.clear()
    _SKIP_RUN.clear()


def demo_records(root: Path, n: int | None = None) -> list[dict]:
    lines = (root / "demo.jsonl").read_text().splitlines()
    return [json.loads(t) for t in lines[:n]]


class Inputs(NamedTuple):
    """build_dataset's arguments: `build_dataset(*inputs)`."""

    data: DataConfig
    paths: DataPaths
    files: list[str]


def settings_for(root: Path, ckpt: Path, files: list[Path], tmp: Path, **kw) -> Inputs:
    """The test's data settings (kw: DataConfig fields) and a run's paths under tmp."""
    kw = {"num_crops": NUM_CROPS, "max_pixels": MAX_PIXELS, "max_length": MAX_LENGTH, **kw}
    paths = DataPaths(processor_dir=str(ckpt), quarantine_dir=str(tmp / "quarantine"), work_dir=str(tmp / "work"))
    return Inputs(DataConfig(images_root=str(root / "images"), **kw), paths, [str(f) for f in files])


def expected_example(processor: Phi3VProcessor, root: Path, rec: dict):
    """The same record through the processor in plain Python (no Ray)."""
    images = [Image.open(root / "images" / rel).convert("RGB") for turn in rec["conversations"] for rel in turn["images"]]
    return build_example(processor, rec["conversations"], images, max_length=MAX_LENGTH)


# ------------------------------------------------------------------------------------ settings


def test_inputs_report_every_problem_at_once(tmp_path):
    data = DataConfig(images_root=str(tmp_path / "missing"), num_crops=17, overflow="cut", on_bad_record="skip",
                      preprocess_actors=3, preprocess_max_actors=1, preprocess_cpus=0)
    with pytest.raises(ConfigError) as e:  # before anything is written or Ray is asked for
        build_dataset(data, DataPaths(processor_dir=str(tmp_path)), [tmp_path / "nope.jsonl"])
    assert {p.field for p in e.value.problems} == {"files", "images_root", "processor_dir", "num_crops", "overflow",
                                                   "quarantine_dir", "preprocess_max_actors", "preprocess_cpus"}


def test_cpu_rules_and_actor_arguments(tmp_path):
    s = DataConfig(preprocess_actors=1, preprocess_max_actors=2, preprocess_cpus=0.5, data_node_resource="data_node")
    assert recommended_ray_init_cpus(2, 1.0, s) == 4  # 2 workers + 2 × 0.5 actors + 0.25 read → 4
    with pytest.raises(ConfigError, match="wait forever.*num_cpus=4") as err:
        check_cpu_budget(2, 2, 1.0, s)  # STACK_NOTES: two 1-CPU workers on ray.init(num_cpus=2) starve Ray Data
    assert err.value.problems[0].field == "cpus_per_worker"
    check_cpu_budget(4, 2, 1.0, s)
    check_cpu_budget(2, 2, 0.5, s)
    kw = map_batches_kwargs(s, DataPaths(processor_dir="ckpt"))
    assert kw["num_cpus"] == 0.5 and kw["resources"] == {"data_node": pytest.approx(0.001)}
    assert (kw["compute"].min_size, kw["compute"].max_size) == (1, 2)
    assert kw["fn_constructor_kwargs"] == {"data": s, "paths": DataPaths(processor_dir="ckpt"), "split": "train"}
    fixed = map_batches_kwargs(DataConfig(preprocess_actors=3), DataPaths(processor_dir="ckpt"), num_workers=8)
    assert (fixed["compute"].min_size, fixed["compute"].max_size) == (3, 3) and "resources" not in fixed


def test_auto_actor_pool_follows_the_training_workers():
    auto = DataConfig(preprocess_cpus=0.5)  # preprocess_actors=0
    assert auto.actor_pool(8) == (8, 16) and auto.actor_pool(8, "val") == (1, 16)
    assert auto.actor_pool() == (1, 2) and DataConfig(preprocess_max_actors=20).actor_pool(8) == (8, 20)
    kw = map_batches_kwargs(auto, DataPaths(processor_dir="ckpt"), num_workers=4)
    assert (kw["compute"].min_size, kw["compute"].max_size) == (4, 8)
    assert recommended_ray_init_cpus(4, 1.0, auto) == 9  # 4 workers + 8 × 0.5 actors + 0.25 read
    check_cpu_budget(6.25, 4, 1.0, auto)  # the first 4 actors must fit: 4 × 0.5 + 0.25
    with pytest.raises(ConfigError, match="4 preprocessing actor"):
        check_cpu_budget(6, 4, 1.0, auto)


# ------------------------------------------------------------------------------------ rows


_NINE: dict = {}


@pytest.fixture
def nine_records(ray_local, pipe_root, tiny_ckpt, tmp_path_factory):
    """8 demo records (1, 2 and N_FRAMES images) + a text-only one: the dataset, and its rows materialized once."""
    if not _NINE:
        tmp = tmp_path_factory.mktemp("nine")
        records = demo_records(pipe_root, 8) + [record("text-only", [])]
        write_jsonl(tmp / "train.jsonl", records)
        ds = build_dataset(*settings_for(pipe_root, tiny_ckpt, [tmp / "train.jsonl"], tmp, preprocess_batch_size=3))
        _NINE.update(records=records, ds=ds, materialized=ds.materialize())
    return _NINE


def test_rows_match_processor_with_ragged_images(nine_records, pipe_root, tiny_ckpt):
    records, mat = nine_records["records"], nine_records["materialized"]
    rows = mat.take_all()

    assert [r["id"] for r in rows] == [r["id"] for r in records]  # file order kept
    assert sorted({int(r["num_images"]) for r in rows}) == [0, 1, 2, N_FRAMES]
    processor = Phi3VProcessor.from_pretrained(tiny_ckpt, num_crops=NUM_CROPS)
    for row, rec in zip(rows, records):
        ex = expected_example(processor, pipe_root, rec)
        assert set(row) == {"id", "input_ids", "labels", "pixel_crops", "image_sizes", "num_images", "num_tokens",
                            "task", "answers"}
        first_answer = rec["conversations"][0]["assistant"]
        assert json.loads(row["answers"]) == (rec.get("answers") or [first_answer])
        assert row["input_ids"].dtype == np.int64 and row["labels"].dtype == np.int64
        np.testing.assert_array_equal(row["input_ids"], ex.input_ids)
        np.testing.assert_array_equal(row["labels"], ex.labels)
        # uint8 crops only (a demo image is one 336-px crop at num_crops 1); the float pixel_values
        # the model reads come back bit for bit on the device side
        assert row["pixel_crops"].dtype == np.uint8
        assert row["pixel_crops"].shape == (ex.num_images, 3, 336, 336)
        sizes = np.asarray(row["image_sizes"]).reshape(-1, 2)
        expanded = pixel_values_from_crops(torch.tensor(row["pixel_crops"]), torch.tensor(sizes),
                                           num_slots=NUM_CROPS + 1)
        np.testing.assert_array_equal(expanded.numpy(), ex.pixel_values)
        np.testing.assert_array_equal(sizes, ex.image_sizes)
        assert (row["num_images"], row["num_tokens"]) == (ex.num_images, len(ex.input_ids))

    # The same rows as the training worker batches them, in file order (no re-execution: materialized).
    batches = list(iter_train_batches(mat, micro_batch=4, epoch=0, seed=0, shuffle_buffer=None,
                                      collate_fn=Phi3VCollate(return_ids=True)))
    assert [i for b in batches for i in b["ids"]] == [r["id"] for r in records]
    first = collate(rows[:4])
    for k in ("input_ids", "attention_mask", "labels", "pixel_crops", "image_sizes"):
        torch.testing.assert_close(batches[0][k], first[k], rtol=0, atol=0)
    assert batches[0]["pixel_crops"].shape[0] == batches[0]["image_sizes"].shape[0] == 1 + 2 + N_FRAMES + 1
    assert batches[0]["pixel_values"] is None  # made on the device: phi3v_ray.collate.to_device


def test_shuffle_is_seeded_and_resume_skips_batches(nine_records):
    def epoch_ids(data, epoch, skip=0):
        it = iter_train_batches(data, micro_batch=2, epoch=epoch, seed=7, shuffle_buffer=4, skip_batches=skip,
                                collate_fn=Phi3VCollate(return_ids=True))
        return [b["ids"] for b in it]

    first = epoch_ids(nine_records["materialized"], 0)
    # A resumed run executes the whole pipeline again and must see the same order, minus what it trained on.
    resumed = epoch_ids(nine_records["ds"], 0, skip=2)
    other = epoch_ids(nine_records["materialized"], 1)
    assert [len(b) for b in first] == [2, 2, 2, 2, 1]
    assert resumed == first[2:]
    # Collated ahead in a background thread (what training does): the same batches in the same order.
    ahead = iter_train_batches(nine_records["ds"], micro_batch=2, epoch=0, seed=7, shuffle_buffer=4, skip_batches=2,
                               collate_fn=Phi3VCollate(return_ids=True), collate_ahead=2)
    assert [b["ids"] for b in ahead] == first[2:]
    assert sorted(sum(other, [])) == sorted(sum(first, [])) and other != first
    assert sum(first, []) != [r["id"] for r in nine_records["records"]]  # actually shuffled


def test_length_grouped_batches_resume_on_a_re_executed_pipeline(nine_records):
    """Grouping by length (what training does with micro_batch > 1) keeps the order exact across a resume."""
    def epoch_ids(data, skip=0):
        it = iter_train_batches(data, micro_batch=2, epoch=0, seed=7, shuffle_buffer=4, skip_batches=skip,
                                length_window=4, collate_fn=Phi3VCollate(return_ids=True))
        return [b["ids"] for b in it]

    first = epoch_ids(nine_records["materialized"])
    assert [len(b) for b in first] == [2, 2, 2, 2, 1]
    assert epoch_ids(nine_records["ds"], skip=2) == first[2:]
    lengths = {r["id"]: len(r["input_ids"]) for r in nine_records["materialized"].take_all()}
    ungrouped = [b["ids"] for b in iter_train_batches(nine_records["materialized"], micro_batch=2, epoch=0, seed=7,
                                                      shuffle_buffer=4, collate_fn=Phi3VCollate(return_ids=True))]

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    assert sorted(sum(first, [])) == sorted(sum(ungrouped, [])) and padding(first) < padding(ungrouped)


def test_cache_data_decodes_each_split_once_and_keeps_its_rows(ray_local, pipe_root, tiny_ckpt, tmp_path):
    """cache_data=true: the trainer gets materialized datasets holding the streamed rows; Ray's C++
    warnings printed meanwhile go to the run's logs/driver.log, not the console."""
    from ray.data.dataset import MaterializedDataset

    from phi3v_ray.config import TrainConfig
    from phi3v_ray.launch import build_datasets, cache_datasets

    write_jsonl(tmp_path / "train.jsonl", demo_records(pipe_root, 6))
    write_jsonl(tmp_path / "val.jsonl", demo_records(pipe_root, 6)[4:])

    def build(cache: bool, name: str):
        cfg = TrainConfig.from_flat(
            name=name, storage_path=str(tmp_path / "runs"), checkpoint=str(tiny_ckpt), cache_data=cache,
            train_file=str(tmp_path / "train.jsonl"), val_file=str(tmp_path / "val.jsonl"),
            images_root=str(pipe_root / "images"), num_crops=NUM_CROPS, max_length=MAX_LENGTH, num_workers=1)
        return build_datasets(cfg)

    built, n_train, n_val = build(True, "cached")
    cached = cache_datasets(built, str(tmp_path / "runs" / "cached"))
    streamed, *_ = build(False, "streamed")
    assert (n_train, n_val) == (6, 2)
    assert all(isinstance(cached[split], MaterializedDataset) for split in ("train", "val"))
    assert not isinstance(streamed["train"], MaterializedDataset)
    for split in ("train", "val"):
        rows = {r["id"]: r["input_ids"].tolist() for r in cached[split].take_all()}
        assert rows == {r["id"]: r["input_ids"].tolist() for r in streamed[split].take_all()}
        assert len(rows) == {"train": 6, "val": 2}[split]


# ------------------------------------------------------------------------------------ resources


def test_parquet_footers_are_read_by_one_actor_per_64_shards_not_32(ray_local, demo_data, tmp_path, monkeypatch):
    """Ray Data's Parquet reader starts 32 footer-reading actors each time a dataset runs, each waiting for a CPU
    to be placed: `footer_readers` asks for what the shard count needs, in the plan `read_parquet` builds."""
    import os

    from datasets_ray.pipeline import FOOTER_ACTORS_ENV, footer_readers
    from datasets_ray.shards import convert_to_shards

    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    convert_to_shards(demo_data, ["val"], tmp_path / "pq", shard_rows=4)
    shards = sorted(str(p) for p in (tmp_path / "pq" / "val").glob("*.parquet"))
    with footer_readers(shards) as wanted:
        ds = ray_local.data.read_parquet(shards)
    assert wanted == 1 and FOOTER_ACTORS_ENV not in os.environ
    listing = ds._logical_plan.dag.input_dependencies[0]  # Ray Data's ListFiles operator
    assert type(listing).__name__ == "ListFiles" and listing.file_indexer._num_actors == 1
    assert len(ds.take_all()) == 8

    counts = []
    for n in (1, 64, 65, 100_000):
        with footer_readers(["s"] * n) as wanted:
            counts.append((wanted, os.environ[FOOTER_ACTORS_ENV]))
    assert counts == [(1, "1"), (1, "1"), (2, "2"), (32, "32")]
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "4")  # a user's own setting wins
    with footer_readers(shards) as wanted:
        assert wanted == 4 and os.environ[FOOTER_ACTORS_ENV] == "4"


def test_streams_through_a_small_object_store(ray_local, pipe_root, tiny_ckpt, tmp_path):
    limit = 12 * 2**20  # just over one 4-frame row (10.8 MB at 1 crop)
    write_jsonl(tmp_path / "train.jsonl", demo_records(pipe_root, 16))
    s = settings_for(pipe_root, tiny_ckpt, [tmp_path / "train.jsonl"], tmp_path, pixel_format="float32",
                     object_store_memory_limit=limit, preprocess_batch_size=1)  # float32: the bulkier layout
    ds = build_dataset(*s)
    assert ds.context.execution_options.resource_limits.object_store_memory == limit
    rows = images = pixel_bytes = 0
    for batch in iter_train_batches(ds, micro_batch=2, epoch=0, seed=0, shuffle_buffer=None):
        rows += batch["input_ids"].shape[0]
        images += batch["image_sizes"].shape[0]
        pixel_bytes += batch["pixel_values"].numel() * 4
    assert rows == 16 and images == 4 * (1 + 2 + N_FRAMES + 1)
    assert pixel_bytes > 5 * limit  # 32 images × 2.7 MB ≈ 87 MB through a 12 MB budget


@pytest.mark.slow  # ~20 s: TorchTrainer start-up
def test_train_workers_holding_cpus_do_not_stall_the_pipeline(ray_local, pipe_root, tiny_ckpt, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    write_jsonl(tmp_path / "train.jsonl", demo_records(pipe_root, 8))
    s = settings_for(pipe_root, tiny_ckpt, [tmp_path / "train.jsonl"], tmp_path)
    check_cpu_budget(ray_local.cluster_resources()["CPU"], 2, 1.0, s.data)
    ds = build_dataset(*s)
    out = tmp_path / "counts"
    out.mkdir()

    def loop(config):  # a local function: pickled by value, the workers need not import this test module
        import json
        from pathlib import Path

        import ray.train

        from phi3v_ray.collate import iter_train_batches

        shard = ray.train.get_dataset_shard("train")
        rows = images = 0
        for batch in iter_train_batches(shard, micro_batch=2, epoch=0, seed=0, shuffle_buffer=4):
            rows += batch["input_ids"].shape[0]
            images += batch["image_sizes"].shape[0]
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"{rank}.json").write_text(json.dumps({"rows": rows, "images": images}))
        ray.train.report({"rows": rows})

    trainer = TorchTrainer(
        loop,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        datasets={"train": ds},
        run_config=RunConfig(name="pipeline-ingest", storage_path=str(tmp_path / "runs")),
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive(), "training + Ray Data did not finish in 300 s (CPU starvation?)"
    assert "result" in outcome and outcome["result"].error is None
    counts = [json.loads((out / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert [c["rows"] for c in counts] == [4, 4]  # equal shards
    assert sum(c["images"] for c in counts) == 2 * (1 + 2 + N_FRAMES + 1)


# ------------------------------------------------------------------------------------ bad records

# case → (record, words the reason must contain)
BAD_CASES = {
    "truncated_image": (record("bad-truncated", ["bad/a.png"]), "truncated"),
    "text_renamed_png": (record("bad-text", ["bad/b.png"]), "cannot identify image file"),
    "decompression_bomb": (record("bad-bomb", ["bad/c.png"]), "decompression bomb"),
    "sequence_too_long": (record("bad-long", ["train/demo-train-00000.0.png"], answer="red green blue " * 1200), "max_length"),
}
_SKIP_RUN: dict = {}


@pytest.fixture
def decode_skip_run(ray_local, pipe_root, tiny_ckpt, tmp_path_factory):
    """One skip-mode run over 6 good records with the four bad ones mixed in (run once, shared)."""
    if not _SKIP_RUN:
        tmp = tmp_path_factory.mktemp("decode-skip")
        good = demo_records(pipe_root, 6)
        records = good[:2] + [BAD_CASES["truncated_image"][0], BAD_CASES["text_renamed_png"][0]] + good[2:4] \
            + [BAD_CASES["decompression_bomb"][0], BAD_CASES["sequence_too_long"][0]] + good[4:]
        write_jsonl(tmp / "train.jsonl", records)
        s = settings_for(pipe_root, tiny_ckpt, [tmp / "train.jsonl"], tmp, on_bad_record="skip", preprocess_batch_size=2)
        ids = [r["id"] for r in build_dataset(*s).take_all()]
        _SKIP_RUN.update(
            file=str(tmp / "train.jsonl"), records=records, ids=ids, report=quarantine_report(s.paths.quarantine_dir),
            entries=read_quarantine(s.paths.quarantine_dir, "train", "decode"),
        )
    return _SKIP_RUN


def run_preprocessor_in_process(settings: Inputs, path: Path) -> dict:
    """The map_batches callable on one batch of manifest rows, called here as a Ray actor calls it."""
    manifest = write_manifest(settings.data, settings.paths, [path], "train")
    rows = [json.loads(t) for t in manifest.path.read_text().splitlines()]
    batch = {k: np.asarray([r[k] for r in rows], dtype=object) for k in MANIFEST_COLUMNS}
    return Phi3VPreprocessor(settings.data, settings.paths, "train")(batch)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_decode_time_bad_record(case, decode_skip_run, pipe_root, tiny_ckpt, tmp_path, monkeypatch):
    bad, words = BAD_CASES[case]
    for name, obj in (("MAX_IMAGE_PIXELS", Image), ("LOAD_TRUNCATED_IMAGES", ImageFile)):
        monkeypatch.setattr(obj, name, getattr(obj, name))  # the actor sets PIL's globals; restore them here

    # fail: an error naming the jsonl file, line, record id and reason (Ray's wrapping: next test)
    path = tmp_path / "train.jsonl"
    write_jsonl(path, demo_records(pipe_root, 1) + [bad])
    with pytest.raises(BadRecord) as err:
        run_preprocessor_in_process(settings_for(pipe_root, tiny_ckpt, [path], tmp_path), path)
    assert (err.value.path, err.value.line, err.value.record_id) == (str(path), 2, bad["id"])
    assert words in err.value.reason

    # skip: the record is quarantined with its reason, the rest arrive, good + bad == total
    run = decode_skip_run
    entries = [e for e in run["entries"] if e["id"] == bad["id"]]
    assert len(entries) == 1 and words in entries[0]["reason"]
    assert entries[0]["file"] == run["file"] and entries[0]["line"] == [r["id"] for r in run["records"]].index(bad["id"]) + 1
    assert json.loads(entries[0]["raw"])["id"] == bad["id"]
    assert bad["id"] not in run["ids"]
    assert run["report"] == {"train.validate": 0, "train.decode": len(BAD_CASES)}
    assert len(run["ids"]) + run["report"]["train.decode"] == len(run["records"])


def test_decode_error_reaches_the_driver_through_ray(ray_local, pipe_root, tiny_ckpt, tmp_path):
    bad, words = BAD_CASES["truncated_image"]
    path = tmp_path / "train.jsonl"
    write_jsonl(path, demo_records(pipe_root, 2) + [bad])
    ds = build_dataset(*settings_for(pipe_root, tiny_ckpt, [path], tmp_path, on_bad_record="fail"))
    with pytest.raises(Exception) as err:
        ds.take_all()
    message = str(err.value)
    assert f"{path}:3 (id={bad['id']})" in message and words in message


def driver_bad_lines(root: Path) -> list[str]:
    img = "train/demo-train-00000.0.png"
    return [
        json.dumps(record("ok-1", [img])),
        '{"id": "broken", "source": "test", "conversations": [',  # malformed JSON
        json.dumps({"id": "no-conv", "source": "test"}),  # missing field
        json.dumps(record("missing-image", ["train/nope.png"])),
        json.dumps(record("escapes-root", ["../demo.jsonl"])),
        json.dumps(record("tags-mismatch", [img], user="<|image_2|>\nWhat colour?")),
        json.dumps(record("empty-answer", [img], answer="  ")),
        json.dumps(record("ok-1", [img])),  # duplicate id in the same file
        json.dumps(record("ok-2", [img, "train/demo-train-00001.1.png"])),
    ]


def test_driver_side_bad_records_fail_with_file_and_line(pipe_root, tiny_ckpt, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(driver_bad_lines(pipe_root)) + "\n")
    with pytest.raises(BadRecord) as err:
        build_dataset(*settings_for(pipe_root, tiny_ckpt, [path], tmp_path))
    assert (err.value.path, err.value.line) == (str(path), 2) and "malformed JSON" in str(err.value)


def test_driver_side_bad_records_are_quarantined_and_counted(ray_local, pipe_root, tiny_ckpt, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(driver_bad_lines(pipe_root)) + "\n")
    write_jsonl(second, [record("ok-2", ["train/demo-train-00002.0.png"]), record("ok-3", ["train/demo-train-00003.0.png"])])
    s = settings_for(pipe_root, tiny_ckpt, [first, second], tmp_path, on_bad_record="skip")
    ids = [r["id"] for r in build_dataset(*s).take_all()]

    assert ids == ["ok-1", "ok-2", "ok-3"]
    entries = read_quarantine(s.paths.quarantine_dir, "train", "validate")
    where = {(Path(e["file"]).name, e["line"]) for e in entries}
    assert where == {("a.jsonl", n) for n in range(2, 9)} | {("b.jsonl", 1)}  # the repeat of ok-2 in b.jsonl too
    assert all(e["reason"] and "raw" in e for e in entries)
    report = quarantine_report(s.paths.quarantine_dir)
    assert report == {"train.validate": 8}
    assert len(ids) + report["train.validate"] == 9 + 2
