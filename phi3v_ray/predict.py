"""`phi3v-ray predict`: ask a trained model about images or a video, in this process, on the CPU.

    phi3v-ray predict --checkpoint runs/x/checkpoint_… --image page.png --question "What is the total?"
    phi3v-ray predict --run runs/x --video clip.avi --question "Which way does the square move?"
    phi3v-ray predict --checkpoint exported/ --jsonl test.jsonl --images-root data/images --out preds.jsonl

What the model can come from:
  - a run's checkpoint directory (train_state.json, manifests), verified first. model/ (full,
    frozen_vision) loads on its own; adapter/ (LoRA, QLoRA) and trainable.safetensors (an
    unfinished full run) load on top of the base named in the run's config (`checkpoint`) or `--base`,
    in the run's mode: what `phi3v-ray eval` does (`load_model` + `load_trainable_weights`);
  - `--run`: a run directory, its newest checkpoint that verifies and holds weights;
  - any folder in the official layout (config.json + safetensors), such as `phi3v-ray export`'s.

A question's prompt is `build_generation_prompt`'s; a jsonl record's is evaluation's (`build_example`
then `prompt_row`: the first turn), and the answers are `generate_answers`' (greedy). Ray is not used.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpointing import STATE_FILE, check_checkpoint, verify_checkpoint


@dataclass
class Predictor:
    """A loaded model with its processor and the run's prompt settings."""

    model: object
    processor: object
    source: Path  # the checkpoint or folder the weights came from
    system: str = ""  # the run's system prompt (DataConfig.system)
    max_new_tokens: int = 64  # the run's generation cap (TrainConfig.max_new_tokens)
    batch: int = 4  # prompts per generation batch in jsonl mode (TrainConfig.eval_batch)

    def ask(self, question: str, images=(), max_new_tokens: int | None = None) -> str:
        """The greedy answer to one question about the images (PIL, in tag order)."""
        from .examples import build_generation_prompt

        ex = build_generation_prompt(self.processor, question, list(images), self.system or None)
        row = {"input_ids": ex.input_ids, "pixel_values": ex.pixel_values if len(images) else None,
               "image_sizes": ex.image_sizes if len(images) else None}
        return self.generate([row], max_new_tokens)[0][0]

    def generate(self, rows: list[dict], max_new_tokens: int | None = None) -> tuple[list[str], list[float]]:
        from .evaluate import generate_answers

        self.model.eval()
        return generate_answers(self.model, self.processor, rows, max_new_tokens or self.max_new_tokens,
                                torch.device("cpu"))


# ----------------------------------------------------------------------------- loading
def load_predictor(checkpoint: str | Path | None = None, run: str | Path | None = None, base: str | Path | None = None,
                   num_crops: int | None = None) -> Predictor:
    """The model of a checkpoint, a run's newest checkpoint, or an official-layout folder, on the CPU."""
    from .config import TrainConfig
    from .engine import load_trainable_weights
    from .hardware import resolve_hardware
    from .processor import Phi3VProcessor
    from .train import load_model

    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of --run or --checkpoint")
    path = newest_usable_checkpoint(_local(run, "run directory")) if run else _local(checkpoint, "checkpoint")
    hw = resolve_hardware(None, "fp32", "sdpa")
    cpu = torch.device("cpu")
    if not (path / STATE_FILE).is_file():  # an exported folder, or any checkpoint in the official layout
        if not (path / "config.json").is_file():
            hint = " (a run directory: use --run)" if any(path.glob("checkpoint_*")) else ""
            raise FileNotFoundError(f"{path}: neither a run's checkpoint ({STATE_FILE}) nor a model folder "
                                    f"(config.json){hint}")
        model = load_model(TrainConfig.from_flat(mode="full"), hw, cpu, str(path), training=False)
        processor = Phi3VProcessor.from_pretrained(path, num_crops=num_crops)
        return Predictor(model, processor, path)

    check_checkpoint(path)  # CheckpointCorrupt naming the file: never answer from damaged weights
    cfg = TrainConfig.from_dict(json.loads((path / STATE_FILE).read_text())["config"])
    if (path / "model").is_dir():  # the whole model in the official layout: no base needed
        weights = path / "model"
        model = load_model(cfg, hw, cpu, str(weights), training=False)
    else:
        if not ((path / "adapter").is_dir() or (path / "trainable.safetensors").is_file()):
            raise FileNotFoundError(f"{path}: holds no weights predict can load (model/, adapter/ or "
                                    "trainable.safetensors); an unfinished ZeRO-2 run has only deepspeed/ shards: "
                                    "give a final checkpoint")
        weights = _local(base or cfg.checkpoint, "base model (the run's `checkpoint`; override with --base)")
        model = load_model(cfg, hw, cpu, str(weights), training=False)
        load_trainable_weights(model, path)
    processor = Phi3VProcessor.from_pretrained(weights, num_crops=num_crops or cfg.data.num_crops)
    return Predictor(model, processor, path, system=cfg.data.system, max_new_tokens=cfg.max_new_tokens,
                     batch=cfg.eval_batch)


def newest_usable_checkpoint(run_dir: Path) -> Path:
    """The run's newest checkpoint that passes verification and holds weights; skipped ones are named on stderr.

    `choose_checkpoint` (resume) also takes a checkpoint that holds only DeepSpeed shards; prediction cannot.
    """
    from .storage import list_checkpoints

    skipped = []
    for candidate in map(Path, list_checkpoints(str(run_dir))):
        problems = verify_checkpoint(candidate)
        if not problems and not any((candidate / n).exists() for n in ("model", "adapter", "trainable.safetensors")):
            problems = ["holds only DeepSpeed shards (model/, adapter/ or trainable.safetensors needed)"]
        if not problems:
            return candidate
        skipped.append(f"{candidate.name}: {'; '.join(problems)}")
        print(f"[phi3v-ray] skipping checkpoint {candidate}: " + "; ".join(problems), file=sys.stderr)
    raise FileNotFoundError(f"{run_dir}: no checkpoint to predict with" + (": " + " | ".join(skipped) if skipped else
                                                                           " (no checkpoint_* directories)"))


def _local(path: str | Path, what: str) -> Path:
    """A local directory as an absolute path (relative to the current directory), or FileNotFoundError naming it."""
    if "://" in str(path):
        raise ValueError(f"{what} {path}: predict reads local directories; copy it here first")
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise FileNotFoundError(f"{what} {resolved}: no such directory")
    return resolved


# ----------------------------------------------------------------------------- inputs
def load_images(paths) -> list:
    """Fully decoded RGB images; FileNotFoundError or ValueError naming the file."""
    from PIL import Image

    images = []
    for p in paths:
        path = Path(p).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"image {path}: no such file")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
            raise ValueError(f"image {path}: cannot be decoded ({type(err).__name__}: {err})") from None
    return images


def video_frames(path, n: int | None = None) -> list:
    """A video's frames as the ucf101 recipe samples them (n, default 8, decoded with PyAV)."""
    from datasets_ray.converters.ucf101 import NUM_FRAMES, sample_frames

    video = Path(path).expanduser().resolve()
    if not video.is_file():
        raise FileNotFoundError(f"video {video}: no such file")
    return sample_frames(video, n or NUM_FRAMES)


# ----------------------------------------------------------------------------- jsonl
def predict_jsonl(predictor: Predictor, jsonl, out, images_root=None, max_new_tokens: int | None = None) -> int:
    """One prediction per record of a jsonl in the project's schema (first turn, as evaluation); returns the count.

    Records are validated first (BadRecord names the file, line and reason). Each output line:
    {"id", "task", "prediction", "raw", "answers", "p_yes"}, evaluation's keys.
    """
    from datasets_ray.schema import validate_file, write_jsonl

    from .evaluate import prompt_row
    from .examples import build_example
    from .metrics import clean_prediction

    jsonl = Path(jsonl).expanduser().resolve()
    if not jsonl.is_file():
        raise FileNotFoundError(f"jsonl {jsonl}: no such file")
    root = Path(images_root).expanduser().resolve() if images_root else jsonl.parent
    if not root.is_dir():
        raise FileNotFoundError(f"images root {root}: no such directory")
    records, _ = validate_file(jsonl, root)

    def predictions():
        for start in range(0, len(records), predictor.batch):
            prompts, metas = [], []
            for rec in records[start:start + predictor.batch]:
                conversations = rec["conversations"]
                images = load_images([root / rel for turn in conversations for rel in turn.get("images") or []])
                ex = build_example(predictor.processor, conversations, images, system=predictor.system or None)
                row = {"input_ids": ex.input_ids, "labels": ex.labels, "pixel_values": ex.pixel_values,
                       "image_sizes": ex.image_sizes,
                       "answers": json.dumps(rec.get("answers") or [conversations[0]["assistant"]])}
                prompt, answers = prompt_row(row, predictor.processor)
                prompts.append(prompt)
                metas.append({"id": rec["id"], "task": rec.get("task") or rec.get("source"), "answers": answers})
            texts, p_yes = predictor.generate(prompts, max_new_tokens)
            for meta, text, p in zip(metas, texts, p_yes):
                yield {**meta, "prediction": clean_prediction(text), "raw": text, "p_yes": p}

    return write_jsonl(Path(out).expanduser().resolve(), predictions())


# ----------------------------------------------------------------------------- the command line
def run_cli(args) -> int:
    """`phi3v-ray predict`: inputs are checked before the model loads; the answer alone goes to stdout."""
    if args.jsonl:
        if args.question or args.image or args.video:
            raise ValueError("--jsonl takes the questions and images from its records: drop --question/--image/--video")
        if not args.out:
            raise ValueError("--jsonl needs --out (the predictions file)")
    else:
        if not args.question:
            raise ValueError("give --question (with --image or --video), or --jsonl")
        if args.image and args.video:
            raise ValueError("give --image or --video, not both")
        if args.video and args.frames < 1:
            raise ValueError(f"--frames {args.frames}: take at least one frame of the video")
        images = video_frames(args.video, args.frames) if args.video else load_images(args.image or [])
    predictor = load_predictor(args.checkpoint, args.run, args.base, args.num_crops)
    if args.jsonl:
        n = predict_jsonl(predictor, args.jsonl, args.out, args.images_root, args.max_new_tokens)
        print(f"[phi3v-ray] wrote {n} predictions to {Path(args.out).resolve()} (model: {predictor.source})",
              file=sys.stderr)
        return 0
    print(predictor.ask(args.question, images, args.max_new_tokens).strip(), flush=True)
    return 0
