"""Training on a real local Ray cluster: LoRA and QLoRA, recovery from a killed worker, a finished run started
again, and the README's eval and export lines on a run.

Real Ray Train workers (2, gloo), real PEFT and bitsandbytes 4-bit; the tiny checkpoint and the
generated demo data. Full fine-tuning and frozen vision (DeepSpeed ZeRO-2) train under Ray in
tests/test_multinode.py and tests/test_submit.py.
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


def _assert_trained(cfg: TrainConfig, result, steps: int) -> None:
    """Every step logged with a finite loss and gradient norm; the final checkpoint holds the adapter, not the model."""
    metrics = _metrics(cfg)
    assert sorted(metrics) == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics.values())
    assert all(math.isfinite(m["grad_norm"]) for m in metrics.values())
    final = Path(result.checkpoint.path)
    state = json.loads((final / "train_state.json").read_text())
    assert state["state"]["step"] == steps
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert not (final / "model").exists()


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


# Per-step loss and learning rate of the uninterrupted RESUME run (2 workers, fp32, CPU; deterministic), read
# from that run's metrics.jsonl: the resumed and the recovered run must land on them after the interruption.
STRAIGHT = {
    1: {"loss": 10.355652332305908, "lr": 0.005},
    2: {"loss": 10.085254192352295, "lr": 0.00375},
    3: {"loss": 9.84554386138916, "lr": 0.0025},
    4: {"loss": 9.586124420166016, "lr": 0.00125},
    5: {"loss": 9.301189422607422, "lr": 0.0},
}


def _logged_steps(cfg: TrainConfig) -> list[int]:
    """Steps in the order rank 0 logged them: a restart from scratch would log steps 1, 2 again."""
    lines = (Path(cfg.storage_path) / cfg.name / "artifacts" / "metrics.jsonl").read_text().splitlines()
    return [m["step"] for m in map(json.loads, lines) if "loss" in m]


def test_a_killed_worker_goes_on_from_its_last_checkpoint_and_a_finished_run_started_again_trains_nothing(
        ray_local, tmp_path, demo_data, tiny_ckpt):
    """One run, one interruption, then the same command once more:

    - rank 1's process dies after step 2: Ray Train restarts the worker group in the same run
      (max_failures=1), which restores the newest checkpoint, of step k: the interruption step, or the
      one before it when the dying worker's last report (which carries that step's checkpoint) had not
      yet been taken from its queue by Ray Train's controller. What follows matches STRAIGHT only if the
      weights, AdamW moments, schedule and RNG (the adapters' dropout) came back; a restart from scratch
      would log step 1 again.
    - started again after its final checkpoint (as when a sweep's driver died just after it, or a user
      runs the same command twice): the driver resumes the run by its name, nothing trains, and the final
      result is reported once more, so Ray Train and Tune end with step 5, not an older one.

    The run reads cached rows (cache_data), the run behind STRAIGHT streamed them: the batch order is the same.
    """
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the controller cannot import this test module
    killed, reports = tmp_path / "killed", tmp_path / "reports.txt"
    cfg = _cfg(tmp_path, demo_data, tiny_ckpt, name="recovered", max_failures=1, cache_data=True,
               fault_injection=f"1:2:{killed}", **RESUME)
    result = run_training(cfg, callbacks=[ReportedSteps(reports)], start_ray=False)
    assert killed.read_text().startswith("killed rank 1 after step 2")

    state = json.loads((Path(result.checkpoint.path) / "train_state.json").read_text())["state"]
    assert state["step"] == 5 and len(state["resumed_at"]) == 1, state
    k = state["resumed_at"][0]
    assert 1 <= k <= 2, state
    # Steps up to the interruption were logged once, and the steps after k once more.
    assert _logged_steps(cfg) == [1, 2, *range(k + 1, 6)]
    recovered = _metrics(cfg)
    for step, straight in STRAIGHT.items():
        assert recovered[step]["loss"] == pytest.approx(straight["loss"], rel=1e-5, abs=1e-6), step
        assert recovered[step]["lr"] == pytest.approx(straight["lr"], rel=1e-9, abs=1e-12), step
    _assert_trained(cfg, result, steps=5)

    reported = reports.read_text().split()
    checkpoints = sorted((Path(cfg.storage_path) / cfg.name).glob("checkpoint_*"))
    # (Without the fault, and streaming: a run with nothing left to train reads no rows, so caching them first
    # would only cost time.)
    again = run_training(cfg.replace(fault_injection="", cache_data=False), callbacks=[ReportedSteps(reports)],
                         start_ray=False)
    assert reports.read_text().split() == [*reported, "5"]  # the final result once more
    assert again.metrics["step"] == 5 and again.metrics["loss"] == result.metrics["loss"]
    assert _logged_steps(cfg) == [1, 2, *range(k + 1, 6)]  # nothing trained
    assert sorted((Path(cfg.storage_path) / cfg.name).glob("checkpoint_*")) == checkpoints  # nor saved


# Each mode trains with two Ray Train workers somewhere in the suite, and each Ray run costs ~40 s of start-up
# on a 2-core machine, so the modes ride on runs that are there anyway: QLoRA below, LoRA in the recovery test
# above, full fine-tuning under ZeRO-2 across two nodes out of a bucket in tests/test_multinode.py, frozen vision
# under ZeRO-2 in the Ray job of tests/test_submit.py. Their numerics (pinned losses, DDP = ZeRO-2) are pinned
# in tests/test_engine.py.
def test_a_qlora_run_reports_on_a_cadence_and_the_readmes_eval_and_export_lines_work_on_it(
        ray_local, tmp_path, monkeypatch, capfd, demo_data, tiny_ckpt):
    """One QLoRA run named as the README's demo run, then the README's `eval` and `export` lines exactly as
    written, from the same working directory (relative paths, the stored settings, the run's own val_file):

    - cadence: a fast loop must not report every step (each report can block ~2 s in Ray Train V2):
      with a long report_every_s only the evaluations and checkpoints report, while metrics.jsonl still
      has every step;
    - evaluation before and after, with per-record predictions and per-task scores, the loss curve and
      TensorBoard; the generation runs on the 4-bit base inside the workers (CPU QLoRA generation once
      crashed); the README's `eval` line scores the final weights as the run's own evaluation did;
    - export: the README's `export` line merges the adapter into the unquantized base, which generates
      what the adapter on that base generates.
    """
    import shlex
    import sys

    from peft import PeftModel
    from PIL import Image
    from ray import cloudpickle
    from test_user_commands import _readme_lines

    from phi3v_ray.cli import main
    from phi3v_ray.evaluate import generate_answers
    from phi3v_ray.examples import build_generation_prompt
    from phi3v_ray.model import Phi3VForCausalLM
    from phi3v_ray.processor import Phi3VProcessor

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the controller cannot import this test module
    monkeypatch.chdir(tmp_path)
    reports = tmp_path / "reports.txt"
    # As in the demo preset, the rows are decoded once (cache_data): both evaluations, and the README's eval
    # line, read them from the object store. (Evaluation streaming in the workers: tests/test_multinode.py.)
    cfg = _cfg(tmp_path, demo_data, tiny_ckpt, name="phi3v-demo", mode="qlora", val_file=str(demo_data / "val.jsonl"),
               eval_before=True, max_new_tokens=4, eval_batch=4, lr=5e-3, max_steps=8, checkpoint_every=4,
               log_every=1, report_every_s=3600, cache_data=True)
    result = run_training(cfg, callbacks=[ReportedSteps(reports)], start_ray=False)
    out = capfd.readouterr().out
    assert "[phi3v-ray] summary of phi3v-demo" in out and "mode=qlora trainable" in out  # rank 0's line, via the queue
    assert [int(x) for x in reports.read_text().split()] == [0, 4, 8]  # evaluation before, then the checkpoints
    assert _logged_steps(cfg) == list(range(1, 9))
    assert result.metrics["step"] == 8 and "loss" in result.metrics
    _assert_trained(cfg, result, steps=8)

    artifacts = Path(cfg.storage_path) / cfg.name / "artifacts"
    for tag in ("before", "after"):
        report = json.loads((artifacts / "eval" / f"{tag}.json").read_text())
        assert report["scores"]["val/n"] == 8 and len(report["predictions"]) == 8
        assert {"prediction", "raw", "answers", "p_yes", "id"} <= set(report["predictions"][0])
    assert (artifacts / "loss_curve.png").is_file()
    assert (artifacts / "tensorboard").is_dir()
    after = json.loads((artifacts / "eval" / "after.json").read_text())

    evals = [line for line in _readme_lines("eval") if "runs/phi3v-demo" in line]
    exports = [line for line in _readme_lines("export") if "runs/phi3v-demo" in line]
    assert evals and exports, "the README shows how to evaluate and export the demo run"
    assert main(shlex.split(evals[0])[1:]) == 0
    evaluated = json.loads((tmp_path / "runs/phi3v-demo-eval/artifacts/eval/eval.json").read_text())
    assert evaluated["step"] == 8 and evaluated["scores"] == after["scores"]  # the trained weights, same settings
    assert [p["prediction"] for p in evaluated["predictions"]] == [p["prediction"] for p in after["predictions"]]
    assert {p["task"] for p in evaluated["predictions"]} == {"colour", "bigger", "fade", "digit"}
    assert any(k.startswith("val/colour/") for k in evaluated["scores"])  # per-task scores need the task on every row
    assert main(["eval", "checkpoint=runs/phi3v-demo", "val_file=data/nonexistent.jsonl"]) == 2  # before any worker

    assert main(shlex.split(exports[0])[1:]) == 0
    out_dir = tmp_path / shlex.split(exports[0])[shlex.split(exports[0]).index("--out") + 1]
    assert (out_dir / "config.json").is_file() and list(out_dir.glob("*.safetensors"))
    adapter_dir = Path(result.checkpoint.path) / "adapter"
    in_memory = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny_ckpt), adapter_dir).eval()
    exported = Phi3VForCausalLM.from_pretrained(out_dir).eval()
    processor = Phi3VProcessor.from_pretrained(out_dir, num_crops=1)
    rows = []
    for line in (demo_data / "val.jsonl").read_text().splitlines()[:3]:
        turn = json.loads(line)["conversations"][0]
        images = [Image.open(demo_data / "images" / p) for p in turn["images"]]
        ex = build_generation_prompt(processor, turn["user"], images)
        rows.append({"input_ids": ex.input_ids, "pixel_values": ex.pixel_values, "image_sizes": ex.image_sizes})
    a, _ = generate_answers(in_memory, processor, rows, 6, torch.device("cpu"))
    b, _ = generate_answers(exported, processor, rows, 6, torch.device("cpu"))
    assert a == b

    capfd.readouterr()
    assert main(["train", "mode=lora", "max_steps=2"]) == 2  # same name, other mode: refused, with the way out
    assert "name=phi3v-demo-lora" in capfd.readouterr().err
