"""Data, weights and run files on object storage, against a real S3 server (moto) on 127.0.0.1.

The server runs in its own process (tests/s3_server.py); pyarrow reaches it through AWS_ENDPOINT_URL
as it reaches a real bucket through the node's credentials. The bucket holds the demo data as
jsonl + images, the same data as Parquet shards, and a tiny checkpoint with its checksums (the `s3` and
`bucket` fixtures, tests/conftest.py). A whole training run out of the bucket, on four raylets with no
shared filesystem, is in tests/test_multinode.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from s3_server import BUCKET, s3_server


def _put(s3, key: str, body: bytes | str) -> str:
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=body.encode() if isinstance(body, str) else body)
    return f"s3://{BUCKET}/{key}"


# ------------------------------------------------------------------------------------ run files
def test_run_files_on_a_bucket_are_written_whole(s3, tmp_path):
    from datasets_ray.schema import write_jsonl
    from phi3v_ray.storage import append_text, delete_file, is_dir, is_file, list_names, read_text, write_text

    run = f"s3://{BUCKET}/runs/files"
    write_text(f"{run}/a.json", "{}")
    append_text(f"{run}/log.jsonl", "1\n")
    append_text(f"{run}/log.jsonl", "2\n")
    assert read_text(f"{run}/log.jsonl") == "1\n2\n" and read_text(f"{run}/none") is None
    assert is_file(f"{run}/a.json") and is_dir(run) and not is_file(f"{run}/none")

    def records_then_crash():
        yield {"id": "1"}
        raise RuntimeError("converter died")

    for target in (f"{run}/half.jsonl", str(tmp_path / "half.jsonl")):  # a failed writer leaves no file at all
        with pytest.raises(RuntimeError):
            write_jsonl(target, records_then_crash())
        assert not is_file(target)
    assert list_names(run) == ["a.json", "log.jsonl"]
    assert os.listdir(tmp_path) == []  # not even a temporary file
    delete_file(f"{run}/a.json")
    assert list_names(run) == ["log.jsonl"]


def test_config_accepts_bucket_paths_and_names_missing_ones(bucket):
    from phi3v_ray.config import ConfigError, TrainConfig

    demo = bucket["demo"]
    cfg = TrainConfig.from_flat(checkpoint=bucket["ckpt"], train_file=f"{demo}/train.jsonl",
                                val_file=f"{bucket['parquet']}/val", images_root=f"{demo}/images")
    cfg.validate()
    TrainConfig.from_flat(checkpoint=bucket["ckpt"], train_file=f"{bucket['parquet']}/train").validate()  # no images_root
    with pytest.raises(ConfigError) as err:
        cfg.replace(train_file=f"{demo}/nope.jsonl", images_root=f"{demo}/no-images",
                    checkpoint=f"s3://{BUCKET}/models/none").validate()
    assert {p.field for p in err.value.problems} == {"train_file", "images_root", "checkpoint"}


# ------------------------------------------------------------------------------------ schemes (no server)
def test_a_store_this_pyarrow_cannot_open_names_the_package_to_install(demo_data, monkeypatch):
    from phi3v_ray.config import TrainConfig
    from phi3v_ray.storage import StorageUnsupported, read_text

    # A pyarrow built without GCS and Azure, as Python sees it: those filesystem modules are not there.
    monkeypatch.setitem(sys.modules, "pyarrow._gcsfs", None)
    monkeypatch.setitem(sys.modules, "pyarrow._azurefs", None)
    gcs, azure = "gs://data/runs", "abfs://data@account.dfs.core.windows.net/runs"
    for uri, name in ((gcs, "GCS"), (azure, "Azure")):
        with pytest.raises(StorageUnsupported, match=rf"^{re.escape(uri)}/a.json: this pyarrow \(.*\) was built without "
                                                     rf"its {name} filesystem.*pip install .*'pyarrow>=17'"):
            read_text(f"{uri}/a.json")
    # The driver says so for every setting before Ray starts (storage_path: Ray Train opens it on every node).
    cfg = TrainConfig.from_flat(storage_path=gcs, checkpoint=f"{azure}/model", train_file=f"{gcs}/train.jsonl",
                                images_root=str(demo_data / "images"))
    named = {p.field for p in cfg.path_problems() if "pip install" in p.fix}
    assert named == {"storage_path", "checkpoint", "train_file"}


@pytest.mark.parametrize("uri, fix", [
    ("az://data/x", "az:// is another tool's name for this store; write it as abfs://CONTAINER@ACCOUNT.dfs.core."),
    ("abfs://data/x", "write it as abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/"),  # no account: pyarrow's own check
    ("s4://bucket/x", "unknown storage scheme s4://; use a local or NFS path, or one of s3://, gs://"),
])
def test_a_malformed_or_unknown_uri_is_named_with_its_form(uri, fix):
    from phi3v_ray.storage import StorageUnsupported, filesystem

    with pytest.raises(StorageUnsupported, match=re.escape(fix)) as err:
        filesystem(uri)
    assert str(err.value).startswith(f"{uri}: ")


# ------------------------------------------------------------------------------------ weights
def _cache_env(tmp_path) -> dict:
    return dict(os.environ, PHI3V_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(Path(__file__).parents[1]))


def test_checkpoint_is_fetched_once_per_node_verified_and_reused(bucket, tmp_path, monkeypatch):
    from phi3v_ray.processor import Phi3VProcessor
    from phi3v_ray.weights import cache_dir_for, local_checkpoint

    env = _cache_env(tmp_path)
    monkeypatch.setenv("PHI3V_CACHE_DIR", env["PHI3V_CACHE_DIR"])
    code = "import sys; from phi3v_ray.weights import local_checkpoint; print(local_checkpoint(sys.argv[1]))"
    # Four processes on one node at once (as eight workers would): one downloads, the others wait for it.
    procs = [subprocess.Popen([sys.executable, "-c", code, bucket["ckpt"]], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    target = cache_dir_for(bucket["ckpt"])
    assert outs == {str(target)}
    log = target.parent / "downloads.log"
    assert len(log.read_text().splitlines()) == 1
    for path in bucket["local_ckpt"].iterdir():
        assert hashlib.sha256((target / path.name).read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()
    assert json.loads((target / ".phi3v-cache.json").read_text())["verified"] == "sha256"

    assert local_checkpoint(bucket["ckpt"]) == str(target)  # reused
    assert len(log.read_text().splitlines()) == 1
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a damaged copy is fetched again
    local_checkpoint(bucket["ckpt"])
    assert len(log.read_text().splitlines()) == 2 and weights.stat().st_size > 100

    processor = Phi3VProcessor.from_pretrained(bucket["ckpt"], num_crops=1)  # tokenizer files only, no weights
    assert processor.encode_text("red", add_special_tokens=False)
    assert not (cache_dir_for(bucket["ckpt"], processor_only=True) / "model.safetensors").exists()


def test_checkpoint_that_fails_its_checksums_is_refused(s3, bucket, tmp_path, monkeypatch):
    from phi3v_ray.storage import upload_dir
    from phi3v_ray.weights import CheckpointDownloadError, cache_dir_for, local_checkpoint

    monkeypatch.setenv("PHI3V_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "bad"
    shutil.copytree(bucket["local_ckpt"], bad)
    (bad / "config.json").write_text((bad / "config.json").read_text().replace("64", "65", 1))  # same size, other bytes
    upload_dir(bad, f"s3://{BUCKET}/models/bad")
    with pytest.raises(CheckpointDownloadError, match=r"models/bad/config.json: sha256 .* checksums.sha256 says"):
        local_checkpoint(f"s3://{BUCKET}/models/bad")
    assert not cache_dir_for(f"s3://{BUCKET}/models/bad").exists()  # nothing half-downloaded is left to be reused
    assert not list(cache_dir_for(f"s3://{BUCKET}/models/bad").parent.glob(".full.partial-*"))


# ------------------------------------------------------------------------------------ data
def _run_actor(data, paths, manifest, split="train"):
    """The preprocessing actor's class, called in this process on the manifest rows (what Ray Data would pass)."""
    import numpy as np

    from datasets_ray.pipeline import Phi3VPreprocessor, _read_jsonl

    rows = list(_read_jsonl(manifest.path))
    batch = {k: np.asarray([r[k] for r in rows], dtype=object) for k in ("id", "_file", "_line", "record")}
    return Phi3VPreprocessor(data, paths, split)(batch)


def test_bad_records_on_a_bucket_are_handled_as_locally(s3, bucket, tmp_path, monkeypatch):
    from datasets_ray.pipeline import DataPaths, quarantine_report, read_quarantine, write_manifest
    from datasets_ray.schema import BadRecord
    from phi3v_ray.config import DataConfig

    monkeypatch.setenv("PHI3V_CACHE_DIR", str(tmp_path / "cache"))
    demo = bucket["demo"]
    good = [json.loads(line) for line in s3.client.get_object(Bucket=BUCKET, Key="demo/train.jsonl")["Body"].read()
            .decode().splitlines()[:3]]
    good = [r for r in good if len(r["conversations"][0]["images"]) == 1][:1] or good[:1]
    png = s3.client.get_object(Bucket=BUCKET, Key=f"demo/images/{good[0]['conversations'][0]['images'][0]}")["Body"].read()
    _put(s3, "demo/images/bad/truncated.png", png[: len(png) // 2])
    one = good[0]["conversations"][0]

    def rec(rid, image):
        return {"id": rid, "source": "t", "conversations": [{**one, "images": [image]}]}

    records = [good[0], rec("gone", "bad/missing.png"), rec("cut", "bad/truncated.png"), rec("esc", "../x.png")]
    train = _put(s3, "bad/train.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    run = f"s3://{BUCKET}/runs/bad"
    paths = DataPaths(processor_dir=bucket["ckpt"], quarantine_dir=f"{run}/quarantine", work_dir=f"{run}/data")
    data = DataConfig(train_file=train, images_root=f"{demo}/images", num_crops=1, on_bad_record="skip")

    manifest = write_manifest(data, paths, [train], "train")  # the escaping path is refused on the driver
    assert manifest.num_good == 3 and manifest.path == f"{run}/data/train.manifest.jsonl"
    out = _run_actor(data, paths, manifest)  # the missing and the truncated object when fetched
    assert list(out["id"]) == [good[0]["id"]]
    assert quarantine_report(paths.quarantine_dir) == {"train.validate": 1, "train.decode": 2}
    reasons = {e["id"]: (e["file"], e["line"], e["reason"]) for e in read_quarantine(paths.quarantine_dir, "train")}
    assert reasons["gone"][:2] == (train, 2) and f"does not exist under {demo}/images" in reasons["gone"][2]
    assert reasons["cut"][:2] == (train, 3) and "cannot be decoded" in reasons["cut"][2]

    fail = DataConfig(train_file=train, images_root=f"{demo}/images", num_crops=1, on_bad_record="fail")
    with pytest.raises(BadRecord, match=r"s3://phi3v/bad/train.jsonl:4 \(id=esc\).*'\.\.'"):
        write_manifest(fail, paths, [train], "train")
    ok = fail.replace(train_file=train) if hasattr(fail, "replace") else fail
    train2 = _put(s3, "bad/train2.jsonl", "".join(json.dumps(r) + "\n" for r in records[:2]))
    with pytest.raises(BadRecord, match=r"s3://phi3v/bad/train2.jsonl:2 \(id=gone\): image 'bad/missing.png' does not"):
        _run_actor(ok, paths, write_manifest(ok, paths, [train2], "train"))


def test_access_denied_is_a_named_error_not_a_bad_record(demo_data, tiny_ckpt, tmp_path, monkeypatch):
    import boto3

    from datasets_ray.pipeline import DataPaths, Phi3VPreprocessor, write_manifest
    from phi3v_ray.config import DataConfig, TrainConfig
    from phi3v_ray.storage import StorageAccessDenied, read_bytes
    from phi3v_ray.weights import local_checkpoint

    # The first three requests (bucket, object, the user's key) are free; after that credentials count.
    with s3_server(no_auth_actions=4, set_environ=False) as locked:
        locked.client.create_bucket(Bucket="locked")
        image = sorted((demo_data / "images").rglob("*.png"))[0]
        locked.client.put_object(Bucket="locked", Key="images/a.png", Body=image.read_bytes())
        iam = boto3.client("iam", endpoint_url=locked.endpoint, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        iam.create_user(UserName="no-policy")
        key = iam.create_access_key(UserName="no-policy")["AccessKey"]
        for k, v in {**locked.env, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                     "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("PHI3V_CACHE_DIR", str(tmp_path / "cache"))

        with pytest.raises(StorageAccessDenied, match=r"access denied to s3://locked/images/a.png: grant .* read access"):
            read_bytes("s3://locked/images/a.png")
        with pytest.raises(StorageAccessDenied, match="s3://locked/models/tiny"):
            local_checkpoint("s3://locked/models/tiny")
        problems = TrainConfig.from_flat(checkpoint="s3://locked/models/tiny", train_file=str(demo_data / "train.jsonl"),
                                         images_root="s3://locked/images").path_problems()
        assert {p.field: "access denied" in p.fix for p in problems} == {"checkpoint": True, "images_root": True}

        # In the actor: one denied image stops the run with the named error (it is the cluster's problem, not the record's).
        data = DataConfig(images_root="s3://locked/images", num_crops=1, on_bad_record="skip")
        paths = DataPaths(processor_dir=str(tiny_ckpt), quarantine_dir=str(tmp_path / "q"), work_dir=str(tmp_path / "w"))
        one = json.loads((demo_data / "train.jsonl").read_text().splitlines()[0])
        rec = {**one, "conversations": [{**one["conversations"][0], "images": ["a.png"]}]}
        jsonl = tmp_path / "t.jsonl"
        jsonl.write_text(json.dumps(rec) + "\n")
        manifest = write_manifest(data, paths, [str(jsonl)], "train")
        with pytest.raises(StorageAccessDenied, match="s3://locked/images/a.png"):
            _run_actor(data, paths, manifest)
        assert not (tmp_path / "q").exists() or not any((tmp_path / "q").glob("*decode*"))
    del Phi3VPreprocessor


def test_parquet_shards_give_the_same_rows_as_jsonl_and_images(bucket, demo_data, tiny_ckpt, tmp_path, monkeypatch):
    import numpy as np
    import pyarrow.parquet as pq

    from datasets_ray.pipeline import DataPaths, Phi3VPreprocessor, write_manifest
    from phi3v_ray.storage import filesystem, list_names
    from phi3v_ray.config import DataConfig

    monkeypatch.setenv("PHI3V_CACHE_DIR", str(tmp_path / "cache"))
    shards = f"{bucket['parquet']}/train"
    assert list_names(shards) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # 32 rows by 12
    data = DataConfig(train_file=shards, num_crops=1, on_bad_record="skip")
    paths = DataPaths(processor_dir=str(tiny_ckpt), quarantine_dir=str(tmp_path / "q"), work_dir=str(tmp_path / "w"))
    manifest = write_manifest(data, paths, [shards], "train")
    assert manifest.num_good == 32 and manifest.parquet is not None and len(manifest.parquet.shards) == 3

    # What read_parquet(..., include_paths=True) hands the actor: the shard's rows and its path without the scheme.
    fs, inner = filesystem(manifest.parquet.shards[0])
    table = pq.read_table(inner, filesystem=fs)
    batch = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in ("id", "row", "record")}
    batch["images"] = np.asarray([np.asarray(x, dtype=object) for x in table.column("images").to_pylist()] + [None],
                                 dtype=object)[:-1]
    batch["path"] = np.asarray([inner] * len(table), dtype=object)
    from_parquet = Phi3VPreprocessor(data, paths, "train", manifest.parquet)(batch)

    local = DataConfig(train_file=str(demo_data / "train.jsonl"), images_root=str(demo_data / "images"), num_crops=1)
    from_files = _run_actor(local, paths, write_manifest(local, paths, [local.train_file], "train"))
    assert list(from_parquet["id"]) == list(from_files["id"])[:12]
    for a, b in zip(from_parquet["pixel_crops"], from_files["pixel_crops"]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(from_parquet["input_ids"], from_files["input_ids"]):
        np.testing.assert_array_equal(a, b)


def test_convert_cli_writes_parquet_to_a_bucket(s3, demo_data, tmp_path):
    from datasets_ray.convert_cli import add_convert_parser
    import argparse

    from datasets_ray.shards import list_shards, read_shard_records

    images = sorted((demo_data / "images").rglob("*.png"))[:2]
    table = tmp_path / "raw" / "train.jsonl"
    table.parent.mkdir()
    table.write_text("".join(json.dumps({"image": str(p), "question": "What colour?", "answer": "red"}) + "\n"
                             for p in images))
    parser = argparse.ArgumentParser()
    add_convert_parser(parser.add_subparsers())
    out = f"s3://{BUCKET}/converted"
    args = parser.parse_args(["convert", "generic", "--src", str(table.parent), "--out", out, "--format", "parquet"])
    assert args.func(args) == 0
    rows = read_shard_records(list_shards(f"{out}/train")[0])
    assert [r[0] for r in rows] == [1, 2] and json.loads(rows[0][1])["conversations"][0]["assistant"] == "red"


# ------------------------------------------------------------------------------------ export
def _checkpoint(ckpt: Path, tiny_ckpt: Path, checkpoint: str, final: bool = True) -> Path:
    """A full-mode checkpoint as a run leaves it, written with the project's own helpers: an optimizer shard the
    export never needs, train_state.json, model/ when it is the final one, and the manifest last."""
    from phi3v_ray.checkpointing import write_manifest
    from phi3v_ray.config import TrainConfig

    (ckpt / "deepspeed").mkdir(parents=True)
    (ckpt / "deepspeed" / "optim_states_rank0.pt").write_bytes(os.urandom(64 * 1024))
    if final:
        shutil.copytree(tiny_ckpt, ckpt / "model")
    config = TrainConfig.from_flat(name=ckpt.parent.name, checkpoint=checkpoint, mode="full", num_crops=1)
    (ckpt / "train_state.json").write_text(json.dumps({"state": {"step": 2, "epoch": 0, "batch_in_epoch": 0,
                                                                 "resumed_at": []}, "history": [],
                                                       "config": config.to_dict()}))
    write_manifest(ckpt, 0, 1)
    return ckpt


def test_export_a_run_from_a_bucket_fetches_only_the_final_weights(s3, bucket, tiny_ckpt, tmp_path, monkeypatch,
                                                                   capsys):
    from phi3v_ray import weights
    from phi3v_ray.cli import main
    from phi3v_ray.storage import upload_dir

    run = tmp_path / "run" / "exp"
    final = _checkpoint(run / "checkpoint_2026-11-29_10-00-00.000000", tiny_ckpt, bucket["ckpt"])
    _checkpoint(run / "checkpoint_2026-11-29_11-00-00.000000", tiny_ckpt, bucket["ckpt"], final=False)  # newer, no weights
    upload_dir(run, f"s3://{BUCKET}/runs/exp")
    fetched, download = [], weights.download_files
    monkeypatch.setattr(weights, "download_files",
                        lambda uri, listing, dest: fetched.append((uri, sorted(listing))) or download(uri, listing, dest))

    out = tmp_path / "exported" / "exp"
    assert main(["export", "--run", f"s3://{BUCKET}/runs/exp", "--out", str(out)]) == 0
    assert f"exported to {out}" in capsys.readouterr().out
    model_files = sorted(f"model/{p.name}" for p in tiny_ckpt.iterdir())
    assert fetched == [(f"s3://{BUCKET}/runs/exp/{final.name}",
                        ["manifest_rank0.json", *model_files, "train_state.json"])]  # no optimizer shard
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_ckpt.iterdir())
    for path in tiny_ckpt.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes()
    assert os.listdir(out.parent) == ["exp"]  # the download folder beside it is gone


def test_export_from_a_bucket_refuses_damaged_weights_and_local_only_out(s3, bucket, tiny_ckpt, tmp_path, capsys):
    from phi3v_ray.cli import main
    from phi3v_ray.storage import upload_dir

    run = tmp_path / "run" / "bad"
    ckpt = _checkpoint(run / "checkpoint_2026-11-29_10-00-00.000000", tiny_ckpt, bucket["ckpt"])
    config = ckpt / "model" / "config.json"
    config.write_text(config.read_text().replace("64", "65", 1))  # same size, other bytes, after the manifest
    upload_dir(run, f"s3://{BUCKET}/runs/bad")
    uri = f"s3://{BUCKET}/runs/bad/{ckpt.name}"

    out = tmp_path / "exported" / "bad"
    assert main(["export", "--checkpoint", uri, "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert f"phi3v-ray: checkpoint {uri} failed verification: {uri}/model/config.json: SHA-256 differs" in err
    assert not out.exists() and os.listdir(out.parent) == []  # nothing written, nothing left behind

    assert main(["export", "--checkpoint", uri, "--out", f"s3://{BUCKET}/exported"]) == 2
    assert "export writes a local folder" in capsys.readouterr().err
    _checkpoint(tmp_path / "run" / "unfinished" / "checkpoint_2026-11-29_10-00-00.000000", tiny_ckpt, bucket["ckpt"],
                final=False)
    upload_dir(tmp_path / "run" / "unfinished", f"s3://{BUCKET}/runs/unfinished")
    assert main(["export", "--run", f"s3://{BUCKET}/runs/unfinished", "--out", str(out)]) == 2
    assert "runs/unfinished: no checkpoint with final weights" in capsys.readouterr().err


def test_export_merges_an_adapter_in_a_bucket_into_its_base_in_the_bucket(s3, bucket, tiny_ckpt, tmp_path,
                                                                            monkeypatch):
    """A LoRA run's adapter and its recorded base (`checkpoint=s3://…`) both come from the bucket; the merged
    weights equal those exported from the same checkpoint on local disk."""
    import torch
    from safetensors.torch import load_file

    from phi3v_ray.checkpointing import export_weights, write_manifest
    from phi3v_ray.config import TrainConfig
    from phi3v_ray.export import export
    from phi3v_ray.hardware import resolve_hardware
    from phi3v_ray.storage import upload_dir
    from phi3v_ray.train import load_model
    from phi3v_ray.weights import cache_dir_for

    monkeypatch.setenv("PHI3V_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig.from_flat(name="lora", mode="lora", checkpoint=bucket["ckpt"], lora_rank=4, lora_alpha=8,
                                num_crops=1, precision="fp32", attention="sdpa")
    torch.manual_seed(0)
    model = load_model(cfg, resolve_hardware(None, "fp32", "sdpa"), torch.device("cpu"), str(tiny_ckpt), training=False)
    with torch.no_grad():  # a trained adapter: B is no longer zero, so merging changes the weights
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    ckpt = tmp_path / "run" / "lora" / "checkpoint_2026-11-29_12-00-00.000000"
    ckpt.mkdir(parents=True)
    export_weights(model, ckpt, str(tiny_ckpt))
    (ckpt / "train_state.json").write_text(json.dumps({"state": {"step": 1, "epoch": 0, "batch_in_epoch": 0,
                                                                 "resumed_at": []}, "history": [],
                                                       "config": cfg.to_dict()}))
    write_manifest(ckpt, 0, 1)
    upload_dir(ckpt.parent, f"s3://{BUCKET}/runs/lora")

    remote = export(tmp_path / "from-bucket", run=f"s3://{BUCKET}/runs/lora")
    local = export(tmp_path / "from-disk", checkpoint=str(ckpt), base=str(tiny_ckpt))
    merged, expected = load_file(str(remote / "model.safetensors")), load_file(str(local / "model.safetensors"))
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)
    base = load_file(str(tiny_ckpt / "model.safetensors"))
    assert any(not torch.equal(merged[k], base[k]) for k in merged if k in base)
    assert (remote / "tokenizer.json").read_bytes() == (tiny_ckpt / "tokenizer.json").read_bytes()
    assert (cache_dir_for(bucket["ckpt"]) / "model.safetensors").is_file()  # the base came from the bucket
