"""`phi3v-ray predict`: checkpoints of every kind answer as the trained model does, on the CPU, without Ray.

Checkpoints are written the way the recipe writes them (`load_model`, the DDP engine, one optimizer
step, `write_checkpoint` with the final weights), in this process: no Ray cluster.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v_ray.checkpointing import TrainState, write_checkpoint
from phi3v_ray.cli import main
from phi3v_ray.collate import collate
from phi3v_ray.config import TrainConfig
from phi3v_ray.engine import build_engine, train_step
from phi3v_ray.evaluate import generate_answers
from phi3v_ray.examples import build_example, build_generation_prompt
from phi3v_ray.hardware import resolve_hardware
from phi3v_ray.predict import load_images, load_predictor, video_frames
from phi3v_ray.processor import Phi3VProcessor
from phi3v_ray.train import load_model

CPU = torch.device("cpu")


def _records(demo_data: Path, split: str = "val") -> list[dict]:
    return [json.loads(line) for line in (demo_data / f"{split}.jsonl").read_text().splitlines()]


def _images(demo_data: Path, rec: dict) -> list[Image.Image]:
    return load_images([demo_data / "images" / p for p in rec["conversations"][0]["images"]])


def _trained(mode: str, tiny_ckpt: Path, demo_data: Path, out: Path, **changes):
    """(final checkpoint directory, the trained model in memory) after one step on one record in `mode`."""
    cfg = TrainConfig.from_flat(mode=mode, checkpoint=str(tiny_ckpt), num_crops=1, precision="fp32", attention="sdpa",
                                zero_stage=0, lora_rank=4, lora_alpha=8, lr=5e-2, warmup_steps=0, micro_batch=1,
                                grad_accum=1, gradient_checkpointing=False, max_new_tokens=5, seed=0, **changes)
    processor = Phi3VProcessor.from_pretrained(tiny_ckpt, num_crops=1)
    rows = []
    for rec in _small(demo_data, "train")[:1]:
        ex = build_example(processor, rec["conversations"], _images(demo_data, rec))
        rows.append({"input_ids": ex.input_ids, "labels": ex.labels, "pixel_values": ex.pixel_values,
                     "image_sizes": ex.image_sizes})
    torch.manual_seed(0)
    model = load_model(cfg, resolve_hardware(None, "fp32", "sdpa"), CPU, str(tiny_ckpt))
    engine = build_engine(cfg, model, total_steps=1, precision="fp32", device=CPU, world_size=1)
    train_step(engine, [collate(rows)])
    ckpt = out / "checkpoint_2026-01-01_00-00-01.000000"
    ckpt.mkdir(parents=True)
    write_checkpoint(ckpt, engine, TrainState(step=1), [], cfg.to_dict(), rank=0, final_weights_from=str(tiny_ckpt))
    return ckpt, engine.model.eval()


def _answers(model, processor, demo_data: Path, records: list[dict], max_new_tokens: int = 3) -> list[str]:
    """What the in-memory model answers to the first turn of each record."""
    rows = []
    for rec in records:
        ex = build_generation_prompt(processor, rec["conversations"][0]["user"], _images(demo_data, rec))
        rows.append({"input_ids": ex.input_ids, "pixel_values": ex.pixel_values, "image_sizes": ex.image_sizes})
    return generate_answers(model, processor, rows, max_new_tokens, CPU)[0]


def _ask_all(predictor, demo_data: Path, records: list[dict], max_new_tokens: int = 3) -> list[str]:
    return [predictor.ask(r["conversations"][0]["user"], _images(demo_data, r), max_new_tokens) for r in records]


def _small(demo_data: Path, split: str = "val") -> list[dict]:
    """Records with one or two images (the video ones cost seconds each on a busy CPU)."""
    return [r for r in _records(demo_data, split) if len(r["conversations"][0]["images"]) <= 2]


@pytest.fixture(scope="module")
def lora(tiny_ckpt, demo_data, tmp_path_factory):
    return _trained("lora", tiny_ckpt, demo_data, tmp_path_factory.mktemp("lora-run"))


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return Phi3VProcessor.from_pretrained(tiny_ckpt, num_crops=1)


# ----------------------------------------------------------------------------- what the model comes from
def test_a_lora_checkpoint_answers_as_the_trained_model_on_its_recorded_base(lora, tiny_ckpt, demo_data, processor,
                                                                              tmp_path):
    ckpt, model = lora
    records = _small(demo_data)[:2]  # one image, two images
    expected = _answers(model, processor, demo_data, records)
    predictor = load_predictor(checkpoint=ckpt)  # the base: the run's `checkpoint` setting in train_state.json
    assert predictor.max_new_tokens == 5 and predictor.processor.image_processor.num_crops == 1  # the run's
    got = _ask_all(predictor, demo_data, records)
    assert got == expected and all(isinstance(a, str) for a in got)
    assert _ask_all(load_predictor(checkpoint=tiny_ckpt), demo_data, records) != expected  # the adapter counts

    base = shutil.copytree(json.loads((ckpt / "train_state.json").read_text())["config"]["checkpoint"],
                           tmp_path / "moved-base")
    assert _ask_all(load_predictor(checkpoint=ckpt, base=base), demo_data, records[:1]) == expected[:1]
    with pytest.raises(FileNotFoundError, match=r"base model .*gone: no such directory"):
        load_predictor(checkpoint=ckpt, base=tmp_path / "gone")


def test_a_full_checkpoint_loads_from_its_model_folder_alone(tiny_ckpt, demo_data, processor, tmp_path):
    ckpt, model = _trained("full", tiny_ckpt, demo_data, tmp_path / "run")
    assert (ckpt / "model").is_dir() and not (ckpt / "trainable.safetensors").exists()  # one copy of the weights
    records = _small(demo_data)[:2]
    expected = _answers(model, processor, demo_data, records)
    predictor = load_predictor(checkpoint=ckpt, base=tmp_path / "nowhere")  # model/ needs no base
    assert _ask_all(predictor, demo_data, records) == expected


def test_an_exported_folder_answers_as_its_adapter_checkpoint(lora, demo_data, tmp_path):
    from phi3v_ray.export import export

    ckpt, _ = lora
    records = _small(demo_data)[:2]
    exported = export(tmp_path / "exported", checkpoint=str(ckpt))
    assert _ask_all(load_predictor(checkpoint=exported), demo_data, records) == \
        _ask_all(load_predictor(checkpoint=ckpt), demo_data, records)


# ----------------------------------------------------------------------------- the command line
def test_cli_prints_the_answer_of_a_run_for_paths_relative_to_the_current_directory(lora, demo_data, monkeypatch, capsys):
    ckpt, _ = lora
    rec = _small(demo_data)[1]  # two images
    monkeypatch.chdir(demo_data)
    images = [str(Path("images") / p) for p in rec["conversations"][0]["images"]]
    relative_run = os.path.relpath(ckpt.parent)  # ../../lora-run0: the run directory, its newest checkpoint
    question = rec["conversations"][0]["user"]
    assert main(["predict", "--run", relative_run, "--image", *images, "--question", question,
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    expected = load_predictor(checkpoint=ckpt).ask(question, load_images(images), max_new_tokens=3).strip()
    assert printed == expected + "\n"


def test_cli_jsonl_writes_one_prediction_per_record_with_its_id(lora, demo_data, tmp_path, capsys):
    ckpt, _ = lora
    out, records = tmp_path / "preds.jsonl", _small(demo_data)[:3]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["predict", "--checkpoint", str(ckpt), "--jsonl", str(tmp_path / "in.jsonl"),
                 "--images-root", str(demo_data / "images"), "--out", str(out), "--max-new-tokens", "2"]) == 0
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in predictions] == [r["id"] for r in records]
    for p, r in zip(predictions, records):
        assert set(p) == {"id", "task", "prediction", "raw", "answers", "p_yes"}  # evaluation's keys
        assert p["answers"] == (r.get("answers") or [r["conversations"][0]["assistant"]]) and p["task"] == r["task"]
        assert isinstance(p["prediction"], str) and 0.0 <= p["p_yes"] <= 1.0
    assert f"wrote {len(records)} predictions" in capsys.readouterr().err


def test_cli_names_the_missing_or_damaged_file(lora, demo_data, tmp_path, capsys):
    ckpt, _ = lora
    cases = [
        (["--checkpoint", str(ckpt), "--image", str(tmp_path / "nope.png"), "--question", "q"], "nope.png: no such file"),
        (["--checkpoint", str(tmp_path / "missing"), "--question", "q"], "missing: no such directory"),
        (["--checkpoint", str(tmp_path), "--question", "q"], "neither a run, a checkpoint, nor a folder of weights"),
        (["--checkpoint", str(ckpt), "--video", str(tmp_path / "clip.avi"), "--question", "q"], "clip.avi: no such file"),
        (["--checkpoint", str(ckpt), "--jsonl", str(demo_data / "val.jsonl")], "--jsonl needs --out"),
        (["--checkpoint", str(ckpt), "--image", str(tmp_path / "x.png")], "give --question"),
        (["--checkpoint", str(ckpt), "--video", "v.avi", "--frames", "0", "--question", "q"], "--frames 0"),
    ]
    (tmp_path / "not-an-image.png").write_bytes(b"text")
    cases.append((["--checkpoint", str(ckpt), "--image", str(tmp_path / "not-an-image.png"), "--question", "q"],
                  "not-an-image.png: cannot be decoded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "source": "s", "conversations": [
        {"images": ["gone.png"], "user": "q", "assistant": "x"}]}) + "\n")
    cases.append((["--checkpoint", str(ckpt), "--jsonl", str(bad), "--out", str(tmp_path / "o.jsonl")],
                  "bad.jsonl:1 (id=a): image 'gone.png' does not exist"))
    damaged = shutil.copytree(ckpt, tmp_path / "damaged")
    (damaged / "adapter" / "adapter_model.safetensors").write_bytes(b"half")
    cases.append((["--checkpoint", str(damaged), "--question", "q"], "adapter_model.safetensors: 4 bytes"))
    run = tmp_path / "run"  # its newest finished checkpoint is damaged: named, never an older one silently
    shutil.copytree(ckpt, run / "checkpoint_2026-01-01_00-00-01.000000")
    shutil.copytree(damaged, run / "checkpoint_2026-01-01_00-00-02.000000")
    cases.append((["--run", str(run), "--question", "q"], "00-02.000000/adapter/adapter_model.safetensors: 4 bytes"))
    for args, message in cases:
        assert main(["predict", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
    assert not (tmp_path / "o.jsonl").exists()


def test_video_frames_are_sampled_as_in_the_ucf101_recipe(tiny_ckpt, tmp_path, capsys):
    av = pytest.importorskip("av")
    video = tmp_path / "clip.avi"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(16):  # frame i has grey level 10 + 12·(i // 2): sampled frame k is frame 2k
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 + 12 * (i // 2), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = video_frames(video)
    assert len(frames) == 8 and frames[0].size == (64, 48)
    assert [round((np.asarray(f.convert("L"), np.float32).mean() - 10) / 12) for f in frames] == list(range(8))
    assert len(video_frames(video, 4)) == 4
    assert main(["predict", "--checkpoint", str(tiny_ckpt), "--video", str(video), "--frames", "3",
                 "--question", "Which way does the square move?", "--max-new-tokens", "2", "--num-crops", "1"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # the answer line alone (a random model's words)


# ----------------------------------------------------------------------------- QLoRA generation on the CPU
def test_qlora_generates_on_a_cpu_where_bitsandbytes_would_repack_the_4bit_weights(tiny_ckpt, demo_data, processor,
                                                                                 tmp_path, monkeypatch):
    """On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first eval-mode forward; the tiny model's
    32-wide CLIP layers made that fail ("shape '[32, 0]' is invalid"), and the repacked layout would stay for
    the training steps after an evaluation. The machine is simulated: bitsandbytes reads the CPU feature when
    it builds each Linear4bit."""
    import math

    modules = pytest.importorskip("bitsandbytes.nn.modules")
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)
    assert modules.Linear4bit(64, 64).support_avx512bf16_for_cpu  # the simulation reaches bitsandbytes

    cfg = TrainConfig.from_flat(mode="qlora", checkpoint=str(tiny_ckpt), num_crops=1, precision="fp32",
                                attention="sdpa", zero_stage=0, lora_rank=4, lora_alpha=8, lr=5e-2, warmup_steps=0,
                                gradient_checkpointing=False, max_new_tokens=3)
    torch.manual_seed(0)
    model = load_model(cfg, resolve_hardware(None, "fp32", "sdpa"), CPU, str(tiny_ckpt))
    layers = [m for m in model.modules() if isinstance(m, modules.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    records = _small(demo_data)[:1]
    model.eval()
    assert all(isinstance(a, str) for a in _answers(model, processor, demo_data, records))  # evaluation before
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)

    model.train()  # training goes on after the evaluation, on the same 4-bit layout
    engine = build_engine(cfg, model, total_steps=1, precision="fp32", device=CPU, world_size=1)
    ex = build_example(processor, records[0]["conversations"], _images(demo_data, records[0]))
    out = train_step(engine, [collate([{"input_ids": ex.input_ids, "labels": ex.labels, "pixel_values": ex.pixel_values,
                                        "image_sizes": ex.image_sizes}])])
    assert math.isfinite(float(out.loss_sum)) and math.isfinite(float(out.grad_norm))
    expected = _answers(model.eval(), processor, demo_data, records)  # evaluation after

    ckpt = tmp_path / "checkpoint_2026-01-01_00-00-01.000000"
    ckpt.mkdir()
    write_checkpoint(ckpt, engine, TrainState(step=1), [], cfg.to_dict(), rank=0, final_weights_from=str(tiny_ckpt))
    assert _ask_all(load_predictor(checkpoint=ckpt), demo_data, records) == expected  # 4-bit base + the adapter
