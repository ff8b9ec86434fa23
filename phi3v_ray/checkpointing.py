"""What a checkpoint holds and how a worker writes and reads it.

    checkpoint_N/
      train_state.json        step, epoch, batches consumed, the metrics history, the config (rank 0)
      rng_rank{r}.pt          each rank's CPU RNG state
      adapter/ | trainable.safetensors + optimizer.pt    DDP engine (rank 0)
      deepspeed/              DeepSpeed engine (every rank writes its optimizer shard)
      model/ | adapter/       final weights in the official layout / PEFT format (final checkpoint)

Each rank writes its pieces into its own temporary directory and hands it to `ray.train.report`,
which merges them into one checkpoint directory in storage.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Files of a Phi-3.5-vision checkpoint that are not weights; final weights carry them along.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "preprocessor_config.json", "generation_config.json", "added_tokens.json")
STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro batches of the current epoch already consumed
    resumed_at: list[int] = field(default_factory=list)  # the step of every resume from a checkpoint


def write_checkpoint(directory: Path, engine, state: TrainState, history: list[dict], config: dict, rank: int,
                     final_weights_from: str | None = None) -> None:
    """This rank's part of a checkpoint; with final_weights_from (the base checkpoint dir), also the final weights."""
    engine.save(directory, rank)
    torch.save(torch.get_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    (directory / STATE_FILE).write_text(json.dumps({"state": asdict(state), "history": history, "config": config}, indent=1))
    if final_weights_from is not None:
        export_weights(engine.model, directory, final_weights_from)


def read_checkpoint(directory: Path, engine, rank: int) -> tuple[TrainState, list[dict]]:
    """Restore the engine (weights, optimizer, schedule) and this rank's RNG; returns (state, history)."""
    engine.load(directory)
    saved = json.loads((directory / STATE_FILE).read_text())
    rng = directory / f"rng_rank{rank}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return TrainState(**saved["state"]), saved.get("history", [])


def export_weights(model, directory: Path, base_checkpoint: str) -> Path:
    """Final weights: the official safetensors layout (model/), or the PEFT adapter (adapter/) for LoRA/QLoRA."""
    if hasattr(model, "peft_config"):
        target = directory / "adapter"
        if not target.is_dir():  # DDP checkpoints already hold it
            model.save_pretrained(target, safe_serialization=True)
    else:
        target = directory / "model"
        model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        source = Path(base_checkpoint) / name
        if source.is_file():
            shutil.copy(source, target / name)
    return target
