"""Training-step benchmark: step time, images/s, tokens/s, peak memory and MFU for any config.

Runs without Ray or DeepSpeed (one process, plain torch AdamW), so it measures the model and the
mode, not the cluster. Weights are random: `--config` takes either a checkpoint directory (e.g. a
tiny one from `phi3v-ray tiny`) or a bare config.json; the default is the official Phi-3.5-vision
config.json that ships with the package (phi3v_ray/model/official_config.json).

Each sample is a DocVQA-shaped page: one W×H image at --num-crops plus --text-tokens of text, the
last --answer-tokens of which are supervised. A 1700×2200 page at 16 crops is 2509 image tokens
(the recipe's DocVQA mean is 2443 tokens/sample).

MFU = achieved model FLOP/s ÷ peak bf16 FLOP/s of the card. Model FLOPs per step (no credit for
gradient-checkpointing recompute) = Σ over the two towers of
    tokens × (2·N + 4·L·T·d)        forward: matmuls + attention scores (causal: T/2 keys on average, ×2 for QKᵀ and AV)
  × (1 + 1 if anything upstream trains + 1 if the tower's own weights train)   backward: activation grads, weight grads
with N the tower's matmul parameters, L layers, d width, T attended length (LM: causal, T/2 on average;
CLIP: 577 per crop, bidirectional). LoRA adapters' own FLOPs are ignored (≪ 1%).

    python bench/step.py --config runs/tiny --mode full --micro-batch 2 --steps 3          # CPU, tiny
    python bench/step.py --device cuda --precision bf16 --mode full --micro-batch 4 \\
        --out bench/results/x.json                                                # GPU, official config
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3v_ray.constants import BOS_ID, CROP_SIZE, IGNORE_INDEX  # noqa: E402
from phi3v_ray.model import Phi3VConfig, Phi3VForCausalLM  # noqa: E402
from phi3v_ray.model.configuration import official_config_path  # noqa: E402
from phi3v_ray.modes import Mode, LoraSettings, apply_mode, count_parameters, enable_gradient_checkpointing  # noqa: E402
from phi3v_ray.processor import hd_scale, tokens_per_image  # noqa: E402

# Dense bf16 peak FLOP/s (no sparsity) by card name fragment.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}


def image_hd_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """Padded HD (H, W) the processor gives a W×H image, without decoding anything."""
    long_side, short_side = max(width, height), min(width, height)
    scale = hd_scale(long_side, short_side, num_crops)
    new_long = scale * CROP_SIZE
    new_short = math.ceil(int(new_long / (long_side / short_side)) / CROP_SIZE) * CROP_SIZE
    return (new_short, new_long) if width >= height else (new_long, new_short)


def load_config(path: Path, attention: str) -> Phi3VConfig:
    file = path / "config.json" if path.is_dir() else path
    config = Phi3VConfig(**json.loads(file.read_text()))
    config._attn_implementation = attention
    return config


def synthetic_batch(config, micro_batch, num_crops, page, text_tokens, answer_tokens, device, dtype):
    height, width = image_hd_size(*page, num_crops)
    n_img = tokens_per_image(height, width)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(micro_batch):
        text = torch.randint(3, 31999, (text_tokens,), generator=g)
        rows.append(torch.cat([torch.tensor([BOS_ID]), text[:8], torch.full((n_img,), -1), text[8:]]))
    input_ids = torch.stack(rows).to(device)
    labels = input_ids.clone()
    labels[:, : -answer_tokens] = IGNORE_INDEX
    pixel_values = torch.randn(micro_batch, num_crops + 1, 3, CROP_SIZE, CROP_SIZE, generator=g).to(device, dtype)
    image_sizes = torch.tensor([[height, width]] * micro_batch, device=device)
    crops = 1 + (height // CROP_SIZE) * (width // CROP_SIZE)
    return dict(input_ids=input_ids, labels=labels, attention_mask=torch.ones_like(input_ids),
                pixel_values=pixel_values, image_sizes=image_sizes), crops


def model_flops_per_step(model, config, mode: Mode, batch_tokens: int, seq_len: int, crops: int, micro_batch: int) -> float:
    vc = config.vision_config
    lm_layers, d = config.num_hidden_layers, config.hidden_size
    lm_n = lm_layers * (d * 3 * d + d * d + 3 * d * config.intermediate_size) + d * config.vocab_size
    used = model.model.vision_embed_tokens.num_feature_layers if hasattr(model, "model") else vc.num_hidden_layers - 1
    clip_n = used * (4 * vc.hidden_size**2 + 2 * vc.hidden_size * vc.intermediate_size)
    proj_n = 4 * vc.hidden_size * d + d * d
    clip_tokens = 577 * crops * micro_batch
    lm_fwd = batch_tokens * (2 * lm_n + 4 * lm_layers * (seq_len / 2) * d)
    clip_fwd = clip_tokens * (2 * clip_n + 4 * used * 577 * vc.hidden_size)
    proj_fwd = 2 * proj_n * (batch_tokens / max(seq_len, 1)) * (seq_len - 64)  # ≈ image tokens
    vision_trains = mode in (Mode.FULL, Mode.LORA, Mode.QLORA)
    lm_factor = 1 + 1 + (1 if mode in (Mode.FULL, Mode.FROZEN_VISION) else 0)
    vis_factor = 1 + (1 if vision_trains else 0) + (1 if mode is Mode.FULL else 0)
    return lm_fwd * lm_factor + (clip_fwd + proj_fwd) * vis_factor


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    config = load_config(Path(args.config), args.attention)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:
        model = Phi3VForCausalLM(config)
    # Pure bf16 weights + AdamW keeps the states in bf16 too; --master-fp32 keeps fp32 weights and
    # autocasts the compute (DeepSpeed's layout: fp32 master copy, half-precision compute).
    if not args.master_fp32:
        model.to(dtype)
    model = apply_mode(model, Mode(args.mode), LoraSettings(rank=args.lora_rank, alpha=2 * args.lora_rank))
    if args.grad_ckpt:
        enable_gradient_checkpointing(model)
    model.train()
    build_s = time.perf_counter() - t0
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.01, fused=device.type == "cuda")
    batch, crops = synthetic_batch(config, args.micro_batch, args.num_crops, args.page, args.text_tokens,
                                   args.answer_tokens, device, dtype)
    seq_len = batch["input_ids"].shape[1]
    tokens = batch["input_ids"].numel()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=args.master_fp32 and dtype != torch.float32):
            loss = model(**batch, loss_only=True).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss, norm

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, norm = step()
        loss_value = float(loss)  # forces the step to finish
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    flops = model_flops_per_step(model.get_base_model() if hasattr(model, "get_base_model") else model,
                                 config, Mode(args.mode), tokens, seq_len, crops, args.micro_batch)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in card), None)
    result = {
        "card": card,
        "config": str(args.config),
        "mode": args.mode,
        "precision": args.precision + ("-mixed" if args.master_fp32 else ""),
        "attention": args.attention,
        "grad_ckpt": args.grad_ckpt,
        "micro_batch": args.micro_batch,
        "num_crops": args.num_crops,
        "seq_len": seq_len,
        "params_total": total,
        "params_trainable": trainable,
        "build_s": round(build_s, 2),
        "step_s": round(step_s, 4),
        "images_per_s": round(args.micro_batch / step_s, 3),
        "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_step": round(flops / 1e12, 2),
        "achieved_tflops": round(flops / step_s / 1e12, 1),
        "mfu": round(flops / step_s / peak, 4) if peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "final_loss": round(loss_value, 4),
        "grad_norm": round(float(norm), 4),
    }
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(official_config_path()),
                   help="checkpoint directory or config.json (weights are random); default: the official config")
    p.add_argument("--mode", default="full", choices=[m.value for m in Mode if m is not Mode.QLORA])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--master-fp32", action="store_true", help="fp32 weights + autocast (mixed precision)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--num-crops", type=int, default=16)
    p.add_argument("--page", type=int, nargs=2, default=(1700, 2200), metavar=("W", "H"))
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", help="append the result as a json line to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
