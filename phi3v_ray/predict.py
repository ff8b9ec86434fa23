"""`phi3v-ray predict`: ask a trained model about images or a video, in this process, on the CPU.

    phi3v-ray predict --checkpoint runs/x/checkpoint_… --image page.png --question "What is the total?"
    phi3v-ray predict --run runs/x --video clip.avi --question "Which way does the square move?"    # its newest
    phi3v-ray predict --checkpoint exported/ --jsonl test.jsonl --images-root data/images --out preds.jsonl

The model is the one `phi3v-ray eval checkpoint=…` evaluates (`resolve.eval_target`): a run directory
(its newest finished checkpoint), a checkpoint directory or its model/ or adapter/, verified first, or
any folder in the official layout such as `phi3v-ray export`'s. model/ (full, frozen_vision) loads on
its own; adapter/ (LoRA, QLoRA) and trainable.safetensors go on top of the base named by the run's
`checkpoint` setting (or `--base`), in the run's mode, as evaluation loads them (`load_model` +
`load_trainable_weights`). The run's num_crops, system prompt and max_new_tokens apply.

A question's prompt is `build_generation_prompt`'s; a jsonl record's is evaluation's (`build_example`
then `prompt_row`: the first turn), and the answers are `generate_answers`' (greedy). Ray is not used.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


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
def load_predictor(checkpoint: str | Path, base: str | Path | None = None, num_crops: int | None = None) -> Predictor:
    """The model `phi3v-ray eval checkpoint=…` would evaluate (`resolve.eval_target`: a run, a checkpoint,
    its model/ or adapter/, or an official-layout folder), loaded on the CPU; `base` replaces the
    adapter's base model recorded with the run."""
    from .config import read_config
    from .engine import load_trainable_weights
    from .hardware import resolve_hardware
    from .processor import Phi3VProcessor
    from .resolve import eval_target
    from .train import load_model

    target = eval_target(str(_local(checkpoint, "checkpoint")))  # verifies a run's checkpoint (CheckpointCorrupt)
    cfg, unknown = read_config(None, None, base=target.settings or {"mode": "full"})  # plain weights: as they are
    if unknown:  # settings stored by another version of phi3v-ray: the ones this version knows apply
        print("[phi3v-ray] ignored stored settings: " + "; ".join(map(str, unknown)), file=sys.stderr)
    weights = Path(target.weights)
    if target.trained:
        weights = _local(base or target.weights, "base model (the run's `checkpoint` setting; override with --base)")
    model = load_model(cfg, resolve_hardware(None, "fp32", "sdpa"), torch.device("cpu"), str(weights), training=False)
    if target.trained:
        load_trainable_weights(model, Path(target.trained))
    crops = num_crops or (cfg.data.num_crops if target.settings else None)  # None: the folder's preprocessor_config
    settings = dict(system=cfg.data.system, max_new_tokens=cfg.max_new_tokens, batch=cfg.eval_batch) if target.settings else {}
    return Predictor(model, Phi3VProcessor.from_pretrained(weights, num_crops=crops),
                     Path(target.trained or target.weights), **settings)


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
def read_records(jsonl, images_root=None) -> tuple[list[dict], Path]:
    """(the validated records of a jsonl in the project's schema, the folder their image paths start from).

    The images root defaults to the jsonl's folder. BadRecord names the file, line and reason.
    """
    from datasets_ray.schema import validate_file

    jsonl = Path(jsonl).expanduser().resolve()
    if not jsonl.is_file():
        raise FileNotFoundError(f"jsonl {jsonl}: no such file")
    root = Path(images_root).expanduser().resolve() if images_root else jsonl.parent
    if not root.is_dir():
        raise FileNotFoundError(f"images root {root}: no such directory")
    return validate_file(jsonl, root)[0], root


def predict_jsonl(predictor: Predictor, records: list[dict], root: Path, out, max_new_tokens: int | None = None) -> int:
    """One prediction per record (its first turn, prompted as evaluation does), written to `out`; returns the count.

    Each line has evaluation's keys: {"id", "task", "prediction", "raw", "answers", "p_yes"}.
    """
    from datasets_ray.schema import write_jsonl

    from .evaluate import prompt_row
    from .examples import build_example
    from .metrics import clean_prediction

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
        records, root = read_records(args.jsonl, args.images_root)
    else:
        if not args.question:
            raise ValueError("give --question (with --image or --video), or --jsonl")
        if args.image and args.video:
            raise ValueError("give --image or --video, not both")
        if args.video and args.frames < 1:
            raise ValueError(f"--frames {args.frames}: take at least one frame of the video")
        images = video_frames(args.video, args.frames) if args.video else load_images(args.image or [])
    predictor = load_predictor(args.checkpoint or args.run, args.base, args.num_crops)
    if args.jsonl:
        n = predict_jsonl(predictor, records, root, args.out, args.max_new_tokens)
        print(f"[phi3v-ray] wrote {n} predictions to {Path(args.out).resolve()} (model: {predictor.source})",
              file=sys.stderr)
        return 0
    print(predictor.ask(args.question, images, args.max_new_tokens).strip(), flush=True)
    return 0
