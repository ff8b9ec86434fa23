"""Training on a real local Ray cluster: every mode, resume, recovery from a killed worker, export.

Real Ray Train workers (2, gloo), real DeepSpeed ZeRO-2 on the CPU accelerator, real PEFT and
bitsandbytes 4-bit; the tiny checkpoint and the generated demo data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ray.train
import torch

from phi3v_ray.config import TrainConfig
from phi3v_ray.launch import run_training

pytestmark = pytest.mark.slow


def _cfg(tmp_path, demo_data, tiny_ckpt, **changes) -> TrainConfig:
    base = TrainConfig.from_flat(
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
        preprocess_actors=1,  # one decoding actor is plenty for 32 small rows; each more starts an interpreter (~5 s)
    )
    return base.replace(**changes)


def _metrics(cfg: TrainConfig) -> dict[int, dict]:
    """Per-step metrics written by rank 0 (the last line wins for a step repeated after a restart)."""
    lines = (Path(cfg.storage_path) / cfg.name / "artifacts" / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines) if "loss" in m}


# LoRA trains in test_a_lora_run_reports_on_a_cadence_evaluates_and_exports, which makes the same checks.
@pytest.mark.parametrize("mode", ["full", "frozen_vision", "qlora"])
def test_each_mode_trains_three_steps_with_two_workers(ray_local, tmp_path, demo_data, tiny_ckpt, mode):
    # QLoRA also evaluates: generation on its 4-bit base inside the workers (CPU QLoRA generation once crashed)
    evaluation = dict(val_file=str(demo_data / "val.jsonl"), eval_max_samples=4, max_new_tokens=2) if mode == "qlora" else {}
    cfg = _cfg(tmp_path, demo_data, tiny_ckpt, mode=mode, **evaluation)
    result = run_training(cfg, start_ray=False)
    if evaluation:
        after = json.loads((Path(cfg.storage_path) / cfg.name / "artifacts" / "eval" / "after.json").read_text())
        assert after["scores"]["val/n"] == 4 and all(isinstance(p["raw"], str) for p in after["predictions"])
    _assert_trained(cfg, result, mode, steps=3)


def _assert_trained(cfg: TrainConfig, result, mode: str, steps: int) -> None:
    """Every step logged with a finite loss and gradient norm; the final checkpoint holds what the mode trains."""
    metrics = _metrics(cfg)
    assert sorted(metrics) == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics.values())
    assert all(math.isfinite(m["grad_norm"]) for m in metrics.values())
    final = Path(result.checkpoint.path)
    state = json.loads((final / "train_state.json").read_text())
    assert state["state"]["step"] == steps
    if mode in ("lora", "qlora"):
        assert (final / "adapter" / "adapter_model.safetensors").is_file()
        assert not (final / "model").exists()
    else:
        assert (final / "model" / "model.safetensors").is_file()
        assert (final / "model" / "tokenizer.json").is_file()
    if mode in ("full", "frozen_vision"):  # both train billions of weights: DeepSpeed ZeRO-2 by default
        assert (final / "deepspeed").is_dir()


class ReportedSteps(ray.train.UserCallback):
    """Appends the step of every report the controller receives to a file (the callback runs in the controller)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(f"{metrics[0]['step']}\n")


# LoRA with dropout: the adapters' dropout masks come from the RNG, so a resume that lost the RNG state,
# the AdamW moments or the schedule would give different losses after the interruption.
RESUME = dict(mode="lora", lora_dropout=0.1, max_steps=5, checkpoint_every=1, lr=5e-3)


_STRAIGHT: dict[str, dict[int, dict]] = {}


@pytest.fixture
def straight_run(ray_local, tmp_path_factory, demo_data, tiny_ckpt) -> dict[int, dict]:
    """Per-step metrics of an uninterrupted 5-step run, the baseline of the two recovery tests (run once)."""
    if "metrics" not in _STRAIGHT:
        cfg = _cfg(tmp_path_factory.mktemp("straight"), demo_data, tiny_ckpt, name="straight", **RESUME)
        run_training(cfg, start_ray=False)
        _STRAIGHT["metrics"] = _metrics(cfg)
    return _STRAIGHT["metrics"]


def _logged_steps(cfg: TrainConfig) -> list[int]:
    """Steps in the order rank 0 logged them: a restart from scratch would log steps 1, 2 again."""
    lines = (Path(cfg.storage_path) / cfg.name / "artifacts" / "metrics.jsonl").read_text().splitlines()
    return [m["step"] for m in map(json.loads, lines) if "loss" in m]


def _assert_resumed_not_restarted(result, cfg: TrainConfig, straight: dict[int, dict], interrupted_after: int) -> None:
    """The run went on from a checkpoint (step k ≥ 1), not from scratch, and then matched the straight run.

    k is the interruption step, or one before it when the dying worker's last report (which carries
    that step's checkpoint) had not yet been taken from its queue by Ray Train's controller.
    """
    state = json.loads((Path(result.checkpoint.path) / "train_state.json").read_text())["state"]
    assert state["step"] == 5 and len(state["resumed_at"]) == 1, state
    k = state["resumed_at"][0]
    assert interrupted_after - 1 <= k <= interrupted_after and k >= 1, state
    # Steps up to the interruption were logged once; steps after k once more: a restart would repeat step 1.
    assert _logged_steps(cfg) == list(range(1, interrupted_after + 1)) + list(range(k + 1, 6))
    resumed = _metrics(cfg)
    for step in range(interrupted_after + 1, max(straight) + 1):  # steps after the interruption
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5, abs=1e-6), step
        assert resumed[step]["lr"] == pytest.approx(straight[step]["lr"], rel=1e-9), step


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(ray_local, tmp_path, demo_data, tiny_ckpt, straight_run):
    marker = tmp_path / "stopped"
    stopped = _cfg(tmp_path, demo_data, tiny_ckpt, name="resumed", fault_injection=f"0:2:{marker}", **RESUME)
    with pytest.raises(Exception):
        run_training(stopped, start_ray=False)  # max_failures=0: the run stops after step 2
    assert marker.is_file()
    result = run_training(stopped.replace(fault_injection=""), start_ray=False)  # same name + storage → resumes

    _assert_resumed_not_restarted(result, stopped, straight_run, interrupted_after=2)


def test_killed_worker_recovers_from_its_last_checkpoint(ray_local, tmp_path, demo_data, tiny_ckpt, straight_run):
    marker = tmp_path / "killed"
    cfg = _cfg(tmp_path, demo_data, tiny_ckpt, name="killed", max_failures=1, fault_injection=f"1:2:{marker}",
               cache_data=True, **RESUME)
    result = run_training(cfg, start_ray=False)
    assert marker.read_text().startswith("killed rank 1 after step 2")
    # What follows the interruption matches the uninterrupted run only if the weights, AdamW state,
    # schedule and RNG (the adapters' dropout) came back from the checkpoint. This run reads cached
    # rows (cache_data), the straight one streamed rows: the batch order is the same.
    _assert_resumed_not_restarted(result, cfg, straight_run, interrupted_after=2)


def test_a_lora_run_reports_on_a_cadence_evaluates_and_exports(ray_local, tmp_path, demo_data, tiny_ckpt):
    """One LoRA run, three concerns (each run costs a minute of Ray start-up on a 2-core machine):

    - cadence: a fast loop must not report every step (each report can block ~2 s in Ray Train V2):
      with a long report_every_s only the evaluations and checkpoints report, while metrics.jsonl still
      has every step; started again after its final checkpoint, nothing trains and the final result is
      reported once more;
    - evaluation before and after, with per-record predictions, the loss curve and TensorBoard;
    - export: the merged model generates what the adapter on its base generates.
    """
    import sys

    from peft import PeftModel
    from ray import cloudpickle

    from phi3v_ray.evaluate import generate_answers
    from phi3v_ray.examples import build_generation_prompt
    from phi3v_ray.export import export
    from phi3v_ray.model import Phi3VForCausalLM
    from phi3v_ray.processor import Phi3VProcessor

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the controller cannot import this test module
    reports = tmp_path / "reports.txt"
    cfg = _cfg(tmp_path, demo_data, tiny_ckpt, val_file=str(demo_data / "val.jsonl"), eval_before=True,
               max_new_tokens=4, eval_batch=4, lr=5e-3, max_steps=8, checkpoint_every=4, log_every=1,
               report_every_s=3600)
    result = run_training(cfg, callbacks=[ReportedSteps(reports)], start_ray=False)
    assert [int(x) for x in reports.read_text().split()] == [0, 4, 8]  # evaluation before, then the checkpoints
    assert _logged_steps(cfg) == list(range(1, 9))
    assert result.metrics["step"] == 8 and "loss" in result.metrics
    _assert_trained(cfg, result, "lora", steps=8)

    # Started again after its final checkpoint (as when a sweep's driver died just after it): nothing to
    # train, and the final result is reported once more, so Ray Train and Tune end with step 8, not older.
    again = run_training(cfg, callbacks=[ReportedSteps(reports)], start_ray=False)
    assert [int(x) for x in reports.read_text().split()] == [0, 4, 8, 8]
    assert again.metrics["step"] == 8 and again.metrics["loss"] == result.metrics["loss"]
    assert _logged_steps(cfg) == list(range(1, 9))

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
