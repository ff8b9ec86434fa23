"""Evaluation on the Ray workers: batched greedy generation (left padding) and the recipe's metrics.

Every worker reads the whole validation dataset and answers the records whose index ≡ rank
(mod world size), so no record is dropped to even out shards. Predictions are gathered on every
rank, scored (accuracy, ANLS both ways, ROC AUC of P(yes)), and rank 0 writes them as json.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist

from .collate import collate, to_device
from .constants import END_ID, IGNORE_INDEX
from .metrics import clean_prediction, summarize
from .processor import Phi3VProcessor, crops_per_image

LENGTH_WINDOW = 4  # evaluation batches are cut from this many batches' worth of prompts, sorted by length


@lru_cache(maxsize=4)
def _processor(checkpoint_dir: str) -> Phi3VProcessor:
    return Phi3VProcessor.from_pretrained(checkpoint_dir)


def prompt_row(row: dict, processor: Phi3VProcessor) -> tuple[dict, list[str]]:
    """A training row → (the first turn's generation prompt, its reference answers)."""
    input_ids, labels = np.asarray(row["input_ids"]), np.asarray(row["labels"])
    supervised = np.nonzero(labels != IGNORE_INDEX)[0]
    start = int(supervised[0]) if supervised.size else len(input_ids)
    prompt = input_ids[:start]
    n_images = int(-prompt.min()) if prompt.size and prompt.min() < 0 else 0
    answers = _answers(row)
    if not answers:
        answer_ids = []
        for token in labels[start:]:
            if token == IGNORE_INDEX or token == END_ID:
                break
            answer_ids.append(int(token))
        answers = [processor.tokenizer.decode(answer_ids, skip_special_tokens=True)]
    sizes = np.asarray(row["image_sizes"]).reshape(-1, 2)
    out = {"input_ids": prompt, "image_sizes": sizes[:n_images] if n_images else None}
    if row.get("pixel_crops") is not None:  # uint8 crops: those of the prompt's images
        out["pixel_crops"] = np.asarray(row["pixel_crops"])[: sum(crops_per_image(sizes[:n_images]))]
    else:
        out["pixel_values"] = np.asarray(row["pixel_values"])[:n_images] if n_images else None
    return out, answers


def _answers(row: dict) -> list[str]:
    value = row.get("answers")
    if value is None:
        return []
    if isinstance(value, (bytes, str)):
        value = json.loads(value) if value else []
    return [str(a) for a in list(value)]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@torch.no_grad()
def generate_answers(model, processor, rows: list[dict], max_new_tokens: int, device, autocast_dtype=None):
    """Greedy answers for a list of prompt rows, plus P(yes) vs P(no) at the first answer token."""
    batch = collate(rows, padding_side="left", pin_memory=device.type == "cuda")
    batch.pop("labels")
    batch = to_device(batch, device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             output_scores=True, return_dict_in_generate=True)
    new_tokens = out.sequences[:, batch["input_ids"].shape[1]:]
    yes_id = processor.encode_text("yes", add_special_tokens=False)[0]
    no_id = processor.encode_text("no", add_special_tokens=False)[0]
    first = torch.softmax(out.scores[0].float(), dim=-1)
    p_yes = (first[:, yes_id] / (first[:, yes_id] + first[:, no_id]).clamp_min(1e-12)).tolist()
    return [processor.decode(t.tolist()) for t in new_tokens], p_yes


def evaluate(model, val_ds, cfg, plan, device, rank: int, world: int, step: int, tag: str, hw=None) -> dict:
    """Score the validation set; returns {"val/accuracy": …} on every rank and writes predictions on rank 0."""
    from .engine import DTYPES
    from .storage import write_text

    processor = _processor(plan.checkpoint_dir)
    autocast = DTYPES[hw.precision] if hw is not None and device.type == "cuda" and hw.precision != "fp32" else None
    was_training = model.training
    model.eval()
    mine: list[dict] = []
    pending: list[tuple[dict, dict]] = []
    limit = cfg.eval_max_samples or None

    def flush():
        # Prompts of similar length share a batch, so a short prompt is not padded to an 8-frame one.
        pending.sort(key=lambda item: len(item[0]["input_ids"]))
        for start in range(0, len(pending), cfg.eval_batch):
            chunk = pending[start:start + cfg.eval_batch]
            texts, p_yes = generate_answers(model, processor, [p for p, _ in chunk], cfg.max_new_tokens, device, autocast)
            for (_, meta), text, p in zip(chunk, texts, p_yes):
                mine.append({**meta, "prediction": clean_prediction(text), "raw": text, "p_yes": p})
        pending.clear()

    index = 0
    for batch in val_ds.iter_batches(batch_size=cfg.eval_batch, batch_format="numpy"):
        n = len(batch["input_ids"])
        for i in range(n):
            if limit is not None and index >= limit:
                break
            if index % world == rank:
                row = {k: batch[k][i] for k in batch}
                prompt, answers = prompt_row(row, processor)
                meta = {"id": _text(row.get("id", index)), "task": _text(row["task"]) if "task" in row else None,
                        "answers": answers}
                pending.append((prompt, meta))
                if len(pending) == cfg.eval_batch * LENGTH_WINDOW:
                    flush()
            index += 1
    flush()
    if was_training:
        model.train()

    gathered = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    predictions = sorted((p for part in gathered for p in part), key=lambda p: p["id"])
    scores = {f"val/{k}": v for k, v in summarize(predictions).items()}
    if rank == 0:
        write_text(f"{plan.run_dir}/artifacts/eval/{tag}.json",
                   json.dumps({"step": step, "tag": tag, "scores": scores, "predictions": predictions}, indent=1))
    return scores
