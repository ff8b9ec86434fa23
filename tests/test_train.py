"""Training on a real local Ray cluster: every mode, resume, recovery from a killed worker, export.

Real Ray Train workers (2, gloo), real DeepSpeed ZeRO-2 on the CPU accelerator, real PEFT and
bitsandbytes 4-bit; the tiny checkpoint and the generated demo data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from phi3v_ray.config import TrainConfig
from phi3v_ray.launch import run_training

pytestmark = pytest.mark.slow


def _cfg(tmp_path, demo_data, tiny_ckpt, **changes) -> TrainConfig:
    base = TrainConfig(
        name="t",
        storage_path=str(tmp_path / "runs"),
        checkpoint=str(tiny_ckpt),
        train_file=str(demo_data / "train.jsonl"),
        images_root=str(demo_data / "images"),
        num_crops=1,
        precision="fp32",
        attention="sdpa",
        mode="lora",
        lora_rank=4,
        lora_alpha=8,
        micro_batch=2,
        grad_accum=1,
        num_workers=2,
        max_steps=3,
        warmup_steps=1,
        lr=1e-3,
        eval_before=False,
        max_failures=0,
        preprocess_cpus=0.5,
    )
    return base.replace(**changes)


def _metrics(cfg: TrainConfig) -> dict[int, dict]:
    """Per-step metrics written by rank 0 (the last line wins for a step repeated after a restart)."""
    lines = (Path(cfg.storage_path) / cfg.name / "artifacts" / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines) if "loss" in m}


@pytest.mark.parametrize("mode", ["full", "frozen_vision", "lora", "qlora"])
def test_each_mode_trains_three_steps_with_two_workers(ray_local, tmp_path, demo_data, tiny_ckpt, mode):
    cfg = _cfg(tmp_path, demo_data, tiny_ckpt, mode=mode)
    result = run_training(cfg, start_ray=False)
    metrics = _metrics(cfg)
    assert sorted(metrics) == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics.values())
    assert all(math.isfinite(m["grad_norm"]) for m in metrics.values())
    final = Path(result.checkpoint.path)
    state = json.loads((final / "train_state.json").read_text())
    assert state["state"]["step"] == 3
    if mode in ("lora", "qlora"):
        assert (final / "adapter" / "adapter_model.safetensors").is_file()
        assert not (final / "model").exists()
    else:
        assert (final / "model" / "model.safetensors").is_file()
        assert (final / "model" / "tokenizer.json").is_file()
    if mode == "full":  # the recipe's full fine-tuning runs under DeepSpeed ZeRO-2
        assert (final / "deepspeed").is_dir()


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(ray_local, tmp_path, demo_data, tiny_ckpt):
    common = dict(mode="full", zero_stage=0, max_steps=5, checkpoint_every=1, lr=5e-4)
    straight = _cfg(tmp_path, demo_data, tiny_ckpt, name="straight", **common)
    run_training(straight, start_ray=False)

    marker = tmp_path / "stopped"
    stopped = _cfg(tmp_path, demo_data, tiny_ckpt, name="resumed", fault_injection=f"0:2:{marker}", **common)
    with pytest.raises(Exception):
        run_training(stopped, start_ray=False)  # max_failures=0: the run stops after step 2
    assert marker.is_file()
    run_training(stopped.replace(fault_injection=""), start_ray=False)  # same name + storage → resumes

    a, b = _metrics(straight), _metrics(stopped)
    assert sorted(b) == [1, 2, 3, 4, 5]
    for step in (3, 4, 5):  # steps after the interruption
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), step
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-9)


def test_killed_worker_recovers_from_its_last_checkpoint(ray_local, tmp_path, demo_data, tiny_ckpt):
    marker = tmp_path / "killed"
    cfg = _cfg(tmp_path, demo_data, tiny_ckpt, mode="lora", max_steps=4, checkpoint_every=1, max_failures=1,
               fault_injection=f"1:2:{marker}")
    result = run_training(cfg, start_ray=False)
    assert marker.read_text().startswith("killed rank 1 after step 2")
    state = json.loads((Path(result.checkpoint.path) / "train_state.json").read_text())
    assert state["state"]["step"] == 4  # the same number of optimizer steps as without the fault
    assert sorted(_metrics(cfg)) == [1, 2, 3, 4]


def test_eval_and_export_of_a_lora_run(ray_local, tmp_path, demo_data, tiny_ckpt):
    from peft import PeftModel

    from phi3v_ray.evaluate import generate_answers
    from phi3v_ray.examples import build_generation_prompt
    from phi3v_ray.export import export
    from phi3v_ray.model import Phi3VForCausalLM
    from phi3v_ray.processor import Phi3VProcessor

    cfg = _cfg(tmp_path, demo_data, tiny_ckpt, val_file=str(demo_data / "val.jsonl"), eval_before=True,
               max_new_tokens=4, eval_batch=4, lr=5e-3)
    result = run_training(cfg, start_ray=False)
    artifacts = Path(cfg.storage_path) / cfg.name / "artifacts"
    for tag in ("before", "after"):
        report = json.loads((artifacts / "eval" / f"{tag}.json").read_text())
        assert report["scores"]["val/n"] == 8 and len(report["predictions"]) == 8
        assert {"prediction", "answers", "p_yes", "id"} <= set(report["predictions"][0])
    assert (artifacts / "loss_curve.png").is_file()
    assert (artifacts / "tensorboard").is_dir()

    adapter_dir = Path(result.checkpoint.path) / "adapter"
    in_memory = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny_ckpt), adapter_dir).eval()
    out = export(tmp_path / "exported", checkpoint=result.checkpoint.path)
    exported = Phi3VForCausalLM.from_pretrained(out).eval()

    processor = Phi3VProcessor.from_pretrained(out, num_crops=1)
    records = [json.loads(line) for line in (demo_data / "val.jsonl").read_text().splitlines()][:3]
    from PIL import Image

    rows = []
    for rec in records:
        turn = rec["conversations"][0]
        images = [Image.open(demo_data / "images" / p) for p in turn["images"]]
        ex = build_generation_prompt(processor, turn["user"], images)
        rows.append({"input_ids": ex.input_ids, "pixel_values": ex.pixel_values, "image_sizes": ex.image_sizes})
    a, _ = generate_answers(in_memory, processor, rows, 6, torch.device("cpu"))
    b, _ = generate_answers(exported, processor, rows, 6, torch.device("cpu"))
    assert a == b


def test_cli_eval_scores_a_checkpoint_on_the_val_file(ray_local, tmp_path, demo_data, tiny_ckpt):
    from phi3v_ray.cli import main

    args = ["eval", f"checkpoint={tiny_ckpt}", f"val_file={demo_data / 'val.jsonl'}",
            f"images_root={demo_data / 'images'}", f"storage_path={tmp_path / 'runs'}", "name=ev",
            "num_workers=2", "num_crops=1", "precision=fp32", "attention=sdpa", "max_new_tokens=2", "eval_batch=4",
            "mode=full", "zero_stage=0"]
    assert main(args) == 0
    report = json.loads((tmp_path / "runs" / "ev" / "artifacts" / "eval" / "eval.json").read_text())
    assert report["scores"]["val/n"] == 8
    tasks = {p["task"] for p in report["predictions"]}
    assert tasks == {"colour", "same_colour", "motion", "digit"}  # per-task scores need the task on every row
    assert any(k.startswith("val/colour/") for k in report["scores"])
    missing = ["eval", f"checkpoint={tiny_ckpt}", f"val_file={tmp_path / 'nonexistent.jsonl'}", f"storage_path={tmp_path}"]
    assert main(missing) == 2  # config problems exit 2 before any worker starts
