"""Export a run's final weights in the official safetensors layout.

Full and frozen-vision runs already hold `model/` in that layout. LoRA and QLoRA runs hold a PEFT
`adapter/`; it is merged into the (unquantized) base model, so the result loads with
`Phi3VForCausalLM.from_pretrained` and in the official code alike. A checkpoint that fails
verification (manifest sizes, SHA-256, finite weights) is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpointing import TOKENIZER_FILES, check_checkpoint


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest `checkpoint_*` directory of a run that holds final weights."""
    candidates = sorted(Path(run_dir).glob("checkpoint_*"), key=lambda p: p.stat().st_mtime)
    final = [c for c in candidates if (c / "model").is_dir() or (c / "adapter").is_dir()]
    if not final:
        raise FileNotFoundError(f"{run_dir}: no checkpoint with final weights (model/ or adapter/) found")
    return final[-1]


def export(out: str | Path, run: str | None = None, checkpoint: str | None = None, base: str | None = None) -> Path:
    import torch

    from .model import Phi3VForCausalLM

    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of --run or --checkpoint")
    ckpt = latest_checkpoint(run) if run else Path(checkpoint)
    check_checkpoint(ckpt)  # CheckpointCorrupt naming the file: never export damaged weights
    out = Path(out)
    if (ckpt / "model").is_dir():
        shutil.copytree(ckpt / "model", out, dirs_exist_ok=True)
        return out
    adapter = ckpt / "adapter"
    if not adapter.is_dir():
        raise FileNotFoundError(f"{ckpt}: holds neither model/ nor adapter/")
    if base is None:
        state = json.loads((ckpt / "train_state.json").read_text())
        base = state["config"]["checkpoint"]
    from peft import PeftModel

    from .weights import local_checkpoint

    base = local_checkpoint(base)  # a base checkpoint in a bucket: this machine's cached copy
    model = Phi3VForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        for source in (adapter / name, Path(base) / name):
            if source.is_file():
                shutil.copy(source, out / name)
                break
    return out
