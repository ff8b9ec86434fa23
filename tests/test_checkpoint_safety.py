"""Checkpoints that cannot be silently corrupt, and resume without unpickling.

Real engines without Ray: the DDP engine in this process, DeepSpeed ZeRO-2 in a one-process gloo
group started with torch.multiprocessing (DeepSpeed needs torch.distributed).
"""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from phi3v_ray.checkpointing import (
    TrainState,
    check_checkpoint,
    read_checkpoint,
    verify_checkpoint,
    write_checkpoint,
    write_manifest,
)
from phi3v_ray.collate import collate
from phi3v_ray.config import TrainConfig
from phi3v_ray.engine import build_engine, refused_pickles, train_step
from phi3v_ray.examples import build_example
from phi3v_ray.hardware import resolve_hardware
from phi3v_ray.processor import Phi3VProcessor
from phi3v_ray.train import refused_pickle_message


class _RunsACommand:
    """What an attacker writes into storage: unpickling it would create `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _cfg(**changes) -> TrainConfig:
    base = dict(mode="full", zero_stage=0, precision="fp32", attention="sdpa", lr=1e-3, warmup_steps=1,
                micro_batch=1, grad_accum=1, num_workers=1, gradient_checkpointing=False, seed=0)
    return TrainConfig.from_dict({**base, **changes})


def _batch(tiny_ckpt: Path, demo_data: Path) -> dict:
    processor = Phi3VProcessor.from_pretrained(tiny_ckpt, num_crops=1)
    rec = next(r for r in map(json.loads, (demo_data / "train.jsonl").read_text().splitlines())
               if len(r["conversations"][0]["images"]) == 1)
    turn = rec["conversations"][0]
    images = [Image.open(demo_data / "images" / p).convert("RGB") for p in turn["images"]]
    ex = build_example(processor, [turn], images)
    return collate([{"input_ids": ex.input_ids, "labels": ex.labels, "pixel_values": ex.pixel_values,
                     "image_sizes": ex.image_sizes}])


def _engine(cfg: TrainConfig, tiny_ckpt: Path):
    from phi3v_ray.train import load_model

    torch.manual_seed(0)
    model = load_model(cfg, resolve_hardware(None, "fp32", "sdpa"), torch.device("cpu"), str(tiny_ckpt))
    return build_engine(cfg, model, total_steps=4, precision="fp32", device=torch.device("cpu"), world_size=1)


def _save_load_and_craft(cfg_dict: dict, tiny_ckpt: str, batch: dict, out: str, victim: str) -> dict:
    """Train a step, checkpoint, resume intact; then swap `victim` for a crafted pickle and resume again."""
    cfg = TrainConfig.from_dict(cfg_dict)
    engine = _engine(cfg, Path(tiny_ckpt))
    train_step(engine, [batch])
    ckpt = Path(out) / "ckpt"
    ckpt.mkdir()
    write_checkpoint(ckpt, engine, TrainState(step=1), [], cfg.to_dict(), rank=0)
    result = {"intact_problems": verify_checkpoint(ckpt), "files": sorted(
        p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())}
    state, _ = read_checkpoint(ckpt, _engine(cfg, Path(tiny_ckpt)), rank=0)
    result["resumed_step"] = state.step
    result["intact_refused"] = refused_pickles(ckpt)

    marker = Path(out) / "marker"
    torch.save({"optimizer": _RunsACommand(str(marker))}, ckpt / victim)
    result["crafted_problems"] = verify_checkpoint(ckpt)
    write_manifest(ckpt, 0, 1)  # even an attacker who also rewrites the manifest gets no code run
    try:
        read_checkpoint(ckpt, _engine(cfg, Path(tiny_ckpt)), rank=0)
        result["load_error"] = None
    except pickle.UnpicklingError as err:
        result["load_error"] = str(err)[:300]
        result["refused"] = refused_pickles(ckpt)
        result["message"] = refused_pickle_message("runs/x/checkpoint_1", ckpt, err)
    result["marker_written"] = marker.exists()
    return result


def _one_rank_main(rank: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        result = _save_load_and_craft(*args)
        Path(args[3], "result.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_refused(result: dict, victim: str) -> None:
    assert result["intact_problems"] == [], result
    assert result["resumed_step"] == 1
    assert any(victim in p for p in result["crafted_problems"]), result["crafted_problems"]
    assert result["load_error"] is not None, "the crafted pickle was loaded"
    assert not result["marker_written"], "unpickling ran the attacker's code"
    # the CLI's last line names the file and the global, not only torch's generic advice
    assert result["intact_refused"] == {}, result["intact_refused"]  # DeepSpeed's own types are allowed
    assert result["refused"] == {victim: ["builtins.exec"]}, result["refused"]
    assert result["message"].startswith(f"runs/x/checkpoint_1/{victim}: refused to unpickle: it names builtins.exec")
    assert "\x1b" not in result["message"] and "nothing in it ran" in result["message"]


def test_a_refused_pickle_not_seen_in_the_opcodes_is_named_from_torchs_message(tmp_path):
    err = pickle.UnpicklingError("Weights only load failed. \x1b[1mdo those steps\x1b[0m.\n\tWeightsUnpickler error: "
                                 "Unsupported global: GLOBAL posix.system was not an allowed global by default.")
    message = refused_pickle_message("runs/x/checkpoint_1/", tmp_path, err)
    assert message.startswith("runs/x/checkpoint_1: refused to unpickle a file of it: it names posix.system, ")
    assert "\x1b" not in message


def test_ddp_resume_refuses_a_crafted_pickle(tiny_ckpt, demo_data, tmp_path):
    result = _save_load_and_craft(_cfg().to_dict(), str(tiny_ckpt), _batch(tiny_ckpt, demo_data), str(tmp_path),
                                  "optimizer.pt")
    assert "manifest_rank0.json" in result["files"] and "trainable.safetensors" in result["files"]
    _assert_refused(result, "optimizer.pt")


@pytest.mark.slow
def test_deepspeed_resume_loads_without_pickle_and_refuses_a_crafted_one(tiny_ckpt, demo_data, tmp_path):
    victim = "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    args = (_cfg(zero_stage=2).to_dict(), str(tiny_ckpt), _batch(tiny_ckpt, demo_data), str(tmp_path), victim)
    mp.start_processes(_one_rank_main, args=(_free_port(), args), nprocs=1, join=True, start_method="spawn")
    result = json.loads((tmp_path / "result.json").read_text())
    assert victim in result["files"], result["files"]
    _assert_refused(result, victim)


# ----------------------------------------------------------------------------- verification
@pytest.fixture
def checkpoint(tiny_ckpt, demo_data, tmp_path) -> Path:
    """A one-step DDP-engine checkpoint of the full model with its final weights."""
    cfg = _cfg()
    engine = _engine(cfg, tiny_ckpt)
    train_step(engine, [_batch(tiny_ckpt, demo_data)])
    ckpt = tmp_path / "checkpoint_1"
    ckpt.mkdir()
    write_checkpoint(ckpt, engine, TrainState(step=1), [], cfg.to_dict(), rank=0, final_weights_from=str(tiny_ckpt))
    assert verify_checkpoint(ckpt) == []
    return ckpt


def test_a_final_checkpoint_holds_the_weights_once_and_resumes_exactly_from_them(tiny_ckpt, demo_data, tmp_path):
    """model/ replaces trainable.safetensors in a final checkpoint; a resumed engine takes the same next step."""
    from safetensors import safe_open

    cfg, batch = _cfg(mode="frozen_vision"), _batch(tiny_ckpt, demo_data)
    engine = _engine(cfg, tiny_ckpt)
    train_step(engine, [batch])
    ckpt = tmp_path / "checkpoint_1"
    ckpt.mkdir()
    write_checkpoint(ckpt, engine, TrainState(step=1), [], cfg.to_dict(), rank=0, final_weights_from=str(tiny_ckpt))
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert "model/model.safetensors" in files and "optimizer.pt" in files and "trainable.safetensors" not in files
    listed = json.loads((ckpt / "manifest_rank0.json").read_text())["files"]
    assert set(listed) == files - {"manifest_rank0.json"} and verify_checkpoint(ckpt) == []
    with safe_open(str(ckpt / "model" / "model.safetensors"), framework="pt") as f:
        assert {n for n, p in engine.model.named_parameters()} == set(f.keys())  # the whole model, once

    resumed = _engine(cfg, tiny_ckpt)
    state, _ = read_checkpoint(ckpt, resumed, rank=0)
    assert state.step == 1
    for (name, a), b in zip(engine.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    first, second = train_step(engine, [batch]), train_step(resumed, [batch])
    assert float(first.loss_sum) == float(second.loss_sum) and resumed.lr() == engine.lr()
    for (name, a), b in zip(engine.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name  # same AdamW moments and schedule: the same update


def test_random_bytes_in_the_weights_are_found(checkpoint):
    weights = checkpoint / "model" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(4096))
    assert weights.stat().st_size == size
    problems = verify_checkpoint(checkpoint)
    assert len(problems) == 1 and str(weights) in problems[0] and "SHA-256" in problems[0]
    with pytest.raises(Exception, match="model.safetensors"):
        check_checkpoint(checkpoint)


@pytest.mark.parametrize("victim", ["optimizer.pt", "model/model.safetensors"])
def test_a_truncated_file_is_named(checkpoint, victim):
    path = checkpoint / victim
    os.truncate(path, path.stat().st_size // 2)
    problems = verify_checkpoint(checkpoint)
    assert len(problems) == 1 and str(path) in problems[0] and "truncated" in problems[0], problems


def test_missing_manifest_or_file_and_non_finite_weights_are_found(checkpoint):
    from safetensors.torch import load_file, save_file

    weights = checkpoint / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))
    write_manifest(checkpoint, 0, 1)  # the hashes match: only the finite check can tell
    assert verify_checkpoint(checkpoint) == [f"{weights}: tensor {name} holds 1 non-finite values"]

    (checkpoint / "train_state.json").unlink()
    assert any("train_state.json: missing" in p for p in verify_checkpoint(checkpoint))
    (checkpoint / "manifest_rank0.json").unlink()
    assert "no manifest" in verify_checkpoint(checkpoint)[0]


def test_a_missing_rank_manifest_makes_the_checkpoint_incomplete(checkpoint):
    manifest = json.loads((checkpoint / "manifest_rank0.json").read_text())
    manifest["world_size"] = 2
    (checkpoint / "manifest_rank0.json").write_text(json.dumps(manifest))
    assert verify_checkpoint(checkpoint) == [f"{checkpoint}: manifests of ranks [1] missing (a rank's piece never arrived)"]


def test_export_refuses_a_checkpoint_that_fails_verification(checkpoint, tmp_path):
    from phi3v_ray.export import export

    weights = checkpoint / "model" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size - 5000)
        f.write(os.urandom(4096))
    with pytest.raises(Exception, match="model.safetensors: SHA-256"):
        export(tmp_path / "out", checkpoint=str(checkpoint))
    assert not (tmp_path / "out").exists()


def test_resume_skips_a_damaged_newest_checkpoint_and_names_it(checkpoint, tmp_path, capfd):
    import shutil

    from phi3v_ray.checkpointing import CheckpointCorrupt
    from phi3v_ray.train import choose_checkpoint

    run = tmp_path / "run"
    names = [f"checkpoint_2026-01-01_00-00-0{i}.000000" for i in (1, 2, 3)]
    for name in names:
        shutil.copytree(checkpoint, run / name)
    os.truncate(run / names[2] / "optimizer.pt", 10)  # the newest: a half-written optimizer file
    (run / names[1] / "manifest_rank0.json").unlink()  # the one before: never finished
    assert choose_checkpoint(str(run)) == str(run / names[0])
    out = capfd.readouterr().out  # `say` writes to the process's stdout
    assert f"skipping checkpoint {run / names[2]}: {run / names[2] / 'optimizer.pt'}: 10 bytes" in out
    assert f"skipping checkpoint {run / names[1]}" in out and "no manifest" in out
    assert f"resuming from the newest good checkpoint {run / names[0]}" in out

    os.truncate(run / names[0] / "model" / "model.safetensors", 10)
    with pytest.raises(CheckpointCorrupt, match="no checkpoint of .* passes verification") as err:
        choose_checkpoint(str(run))
    assert all(name in str(err.value) for name in names)
    assert choose_checkpoint(str(tmp_path / "fresh")) == ""  # a new run: nothing to resume


def test_a_deterministic_failure_is_found_in_rays_wrapping():
    from phi3v_ray.failures import DeterministicFailure, deterministic_message

    inner = DeterministicFailure("bad record: data/train.jsonl:7 (id=r7): image 'x.png' cannot be decoded")
    wrapped = RuntimeError(f"Training failed due to controller error:\nWorker 1 raised:\n{inner}\nTraceback ...")
    assert deterministic_message(wrapped) == "bad record: data/train.jsonl:7 (id=r7): image 'x.png' cannot be decoded"
    assert deterministic_message(RuntimeError("gloo connection reset")) is None
    twice = DeterministicFailure(str(inner) + " (rank 0; not retried)")
    assert deterministic_message(twice).startswith("bad record: data/train.jsonl:7")


def test_demo_data_is_made_for_any_run_name(tmp_path):
    from phi3v_ray.config import load_config
    from phi3v_ray.launch import resolve_defaults

    cfg = resolve_defaults(load_config("demo", [f"storage_path={tmp_path}", "name=my-demo"]))
    assert Path(cfg.data.train_file).is_file() and Path(cfg.data.train_file).parent == tmp_path / "demo-data"


def test_a_bad_record_behind_rays_wrapping_is_deterministic():
    from phi3v_ray.train import _deterministic_cause

    remote = ("ray.exceptions.RayTaskError(UserCodeException): ray::MapWorker.submit() ...\n"
              "datasets_ray.schema.BadRecord: data/train.jsonl:1 (id=r1): image 'a.png' cannot be decoded (x)\n")
    assert _deterministic_cause(RuntimeError(remote)) == (
        "bad record", "data/train.jsonl:1 (id=r1): image 'a.png' cannot be decoded (x)")
    assert _deterministic_cause(RuntimeError("gloo: connection reset by peer")) == ("", None)
