"""Training-step benchmark: the real training step, timed, with model and hardware FLOP utilisation.

What runs is what `train.py` runs: `load_model` (mode, dtypes, QLoRA's 4-bit base, the fused kernels, the
activation-checkpointing plan) and `build_engine` + `train_step` from engine.py, with the engine's autocast.
DeepSpeed ZeRO-2 where the config resolves to it (full, frozen_vision) and `deepspeed` is importable
(a one-process gloo/nccl group is started for it); otherwise the single-GPU DDPEngine path, so it also
runs on a bare GPU box with torch + transformers + peft. No Ray.

Weights are random. `--config` takes a checkpoint directory (e.g. a tiny one from `phi3v-ray tiny`)
or a bare config.json; the default is the official Phi-3.5-vision config.json shipped with the package.
For a bare config the bench writes a random bf16 checkpoint once to --weights-dir (8.3 GB for the
official size) so that `load_model` loads it exactly as in training.

Each sample is a DocVQA-shaped page: one W×H image at --num-crops plus --text-tokens of text, the
last --answer-tokens of which are supervised. A 1700×2200 page at 16 crops is 2509 image tokens
(the recipe's DocVQA mean is 2443 tokens/sample).

FLOPs of one step (`step_flops`), per micro-batch; h width, i MLP width, P a layer's matmul weights:
  forward     LM: tokens × L × (2·P + 2·T·h)        causal attention: QKᵀ and AV over T/2 keys on average
              CLIP: 577·crops × L_used × (2·P + 4·577·h),  patch conv 2·588·h per patch,
              projector 2·(4·h_clip·h + h²) per image token,
              lm_head 2·h·vocab per *supervised* token only (training computes logits only there)
  backward    activation gradients: 1 × forward matmuls of every layer that back-propagates (the LM in
              every mode; CLIP and projector only when something in them trains; under LoRA not the
              first layer's q/k/v input side); attention: 2 × its forward (dQ, dK, dV, dP) whenever the layer
              back-propagates, trainable weights or not;
              weight gradients: 1 × forward matmuls of the trained weights only (none of a frozen base)
  LoRA        each adapted linear (in, out) adds 2·r·(in + out) per token forward, ×3 with backward
  MFU         model FLOPs ÷ step time ÷ peak dense bf16 FLOP/s of the card
  HFU         as MFU, plus the forward of every checkpointed layer again (recompute), which is what
              the hardware executes (the attention kernels' own recompute is not counted)
A frozen tower that does not back-propagate costs its forward only; checkpointing it costs nothing.

    python bench/step.py --config runs/tiny --mode full --micro-batch 2 --steps 3          # CPU, tiny
    python bench/step.py --device cuda --precision bf16 --mode lora --micro-batch 4       # GPU, official
    python bench/step.py --device cuda --precision bf16 --mode lora --fused-kernels none  # without liger's kernels
    bash bench/gpu_step_suite.sh                                 # the table: full/frozen_vision/LoRA/QLoRA
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

from phi3v_ray.config import Mode, TrainConfig  # noqa: E402
from phi3v_ray.constants import BOS_ID, CROP_SIZE, IGNORE_INDEX  # noqa: E402
from phi3v_ray.engine import build_engine, train_step  # noqa: E402
from phi3v_ray.hardware import detect_gpu, resolve_hardware  # noqa: E402
from phi3v_ray.kernels import KERNELS, fused_ops, resolve_kernels  # noqa: E402
from phi3v_ray.memory import CLIP_TOKENS, Dims  # noqa: E402
from phi3v_ray.model import Phi3VConfig  # noqa: E402
from phi3v_ray.model.configuration import official_config_path  # noqa: E402
from phi3v_ray.modes import checkpointable_layers, count_parameters  # noqa: E402
from phi3v_ray.processor import hd_scale, tokens_per_image  # noqa: E402

# Dense bf16 peak FLOP/s (no sparsity) by card name fragment.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}
PATCH = 14  # CLIP ViT-L/14: 3·14·14 inputs per patch


def image_hd_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """Padded HD (H, W) the processor gives a W×H image, without decoding anything."""
    long_side, short_side = max(width, height), min(width, height)
    scale = hd_scale(long_side, short_side, num_crops)
    new_long = scale * CROP_SIZE
    new_short = math.ceil(int(new_long / (long_side / short_side)) / CROP_SIZE) * CROP_SIZE
    return (new_short, new_long) if width >= height else (new_long, new_short)


def load_config(path: Path) -> Phi3VConfig:
    file = path / "config.json" if path.is_dir() else path
    return Phi3VConfig(**json.loads(file.read_text()))


def synthetic_batch(micro_batch, num_crops, page, text_tokens, answer_tokens):
    """One micro-batch of identical DocVQA-shaped pages (on the CPU; the engine moves it)."""
    height, width = image_hd_size(*page, num_crops)
    n_img = tokens_per_image(height, width)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(micro_batch):
        text = torch.randint(3, 31999, (text_tokens,), generator=g)
        rows.append(torch.cat([torch.tensor([BOS_ID]), text[:8], torch.full((n_img,), -1), text[8:]]))
    input_ids = torch.stack(rows)
    labels = input_ids.clone()
    labels[:, : -answer_tokens] = IGNORE_INDEX
    crops = 1 + (height // CROP_SIZE) * (width // CROP_SIZE)
    pixel_values = torch.randn(micro_batch, crops, 3, CROP_SIZE, CROP_SIZE, generator=g)
    image_sizes = torch.tensor([[height, width]] * micro_batch)
    batch = dict(input_ids=input_ids, labels=labels, attention_mask=torch.ones_like(input_ids),
                 pixel_values=pixel_values, image_sizes=image_sizes)
    return batch, crops, n_img


def step_flops(d: Dims, mode: str, *, micro_batch: int, seq_len: int, image_tokens: int, crops: int,
               supervised: int, lora_rank: int = 0, lora_vision: bool = True, lm_checkpointed: int = 0,
               clip_checkpointed: int = 0, causal: bool = True) -> dict[str, float]:
    """Model and hardware FLOPs of one optimizer step (one micro-batch); the module docstring has the rules.

    causal=False counts attention over all T keys, as torch's FlopCounterMode does for a masked kernel.
    """
    lora = mode in ("lora", "qlora")
    clip_backward = mode == "full" or (lora and lora_vision)
    tokens, clip_tokens = micro_batch * seq_len, micro_batch * crops * CLIP_TOKENS
    img_tokens, patches = micro_batch * image_tokens, micro_batch * crops * (CLIP_TOKENS - 1)
    keys = seq_len / 2 if causal else seq_len
    # Forward FLOPs of one layer of each tower, split into weight matmuls and attention.
    lm_mm, lm_attn = 2 * d.lm_layer_params * tokens, 4 * keys * d.hidden * tokens
    clip_mm, clip_attn = 2 * d.clip_layer_params * clip_tokens, 4 * CLIP_TOKENS * d.clip_hidden * clip_tokens
    conv = 2 * 3 * PATCH * PATCH * d.clip_hidden * patches
    proj = 2 * d.projector_params * img_tokens
    head = 2 * d.hidden * d.vocab * micro_batch * supervised
    forward = d.layers * (lm_mm + lm_attn) + d.clip_layers * (clip_mm + clip_attn) + conv + proj + head
    # Backward: activation gradients where the tower back-propagates, weight gradients where weights train.
    act = d.layers * (lm_mm + 2 * lm_attn) + head
    if clip_backward:
        act += d.clip_layers * (clip_mm + 2 * clip_attn) + proj  # the patch conv's input (pixels) needs none
    if lora:  # nothing below the first layer trains: its q/k/v input gradient is never formed
        act -= 2 * d.hidden * (d.hidden + 2 * d.hidden * d.kv_heads // d.heads) * tokens
        if clip_backward:
            act -= 2 * 3 * d.clip_hidden**2 * clip_tokens
    weights = 0.0
    if mode == "full":
        weights = d.layers * lm_mm + head + d.clip_layers * clip_mm + conv + proj
    elif mode == "frozen_vision":
        weights = d.layers * lm_mm + head
    adapters = lm_adapter = clip_adapter = 0.0  # forward FLOPs of one layer's adapters
    if lora:
        h, i, ch, ci = d.hidden, d.intermediate, d.clip_hidden, d.clip_intermediate
        kv = h * d.kv_heads // d.heads
        lm_adapter = 2 * lora_rank * ((h + h + 2 * kv) + 2 * h + (h + 2 * i) + (i + h)) * tokens
        adapter_fwd = d.layers * lm_adapter + 2 * lora_rank * (h + d.vocab) * micro_batch * supervised
        if lora_vision:
            clip_adapter = 2 * lora_rank * (4 * 2 * ch + 2 * (ch + ci)) * clip_tokens
            adapter_fwd += d.clip_layers * clip_adapter + 2 * lora_rank * (4 * ch + 2 * h + h) * img_tokens
        adapters = 3 * adapter_fwd  # forward, activation gradients, weight gradients
    model = forward + act + weights + adapters
    # Recompute: a checkpointed layer runs its forward again (a frozen CLIP never does: no backward).
    recompute = lm_checkpointed * (lm_mm + lm_attn + lm_adapter)
    if clip_backward:
        recompute += clip_checkpointed * (clip_mm + clip_attn + clip_adapter)
    return {"model": model, "hardware": model + recompute, "forward": forward, "adapters": adapters}


def _random_checkpoint(config_path: Path, weights_dir: Path, device: torch.device) -> Path:
    """A checkpoint directory for `load_model`: `config_path` itself if it holds weights, else random bf16 weights."""
    if config_path.is_dir() and any(config_path.glob("*.safetensors")):
        return config_path
    done = weights_dir / "model.safetensors.index.json"
    if done.is_file() or (weights_dir / "model.safetensors").is_file():
        return weights_dir
    from phi3v_ray.model import Phi3VForCausalLM

    config = load_config(config_path)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:
        model = Phi3VForCausalLM(config).to(torch.bfloat16)
    weights_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(weights_dir, safe_serialization=True)
    del model
    return weights_dir


def _engine_config(args, tokens_per_sample: int) -> tuple[TrainConfig, str]:
    cfg = TrainConfig.from_dict(dict(
        mode=args.mode, precision=args.precision, attention=args.attention, fused_kernels=args.fused_kernels,
        micro_batch=args.micro_batch, grad_accum=1, num_workers=1, zero_stage=args.zero_stage, lora_rank=args.lora_rank,
        lora_alpha=2.0 * args.lora_rank, lora_vision=args.lora_vision, lr=1e-5, warmup_steps=0,
        gradient_checkpointing=args.activation_checkpointing != "none",
        activation_checkpointing=args.activation_checkpointing, checkpoint_every_n=args.checkpoint_every_n,
        use_gpu=args.device.startswith("cuda"), data={"max_length": tokens_per_sample}))
    note = ""
    if cfg.resolved_zero_stage == 2:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            cfg, note = cfg.replace(zero_stage=0), "deepspeed not installed: single-GPU DDPEngine"
    return cfg, note


def _process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process."""
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def run(args) -> dict:
    from phi3v_ray.train import load_model

    device = torch.device(args.device)
    gpu = detect_gpu(device.index or 0) if device.type == "cuda" else None
    hw = resolve_hardware(gpu, args.precision, args.attention)
    kernels = resolve_kernels(args.fused_kernels, device)
    config_path = Path(args.config)
    batch, crops, n_img = synthetic_batch(args.micro_batch, args.num_crops, args.page, args.text_tokens,
                                          args.answer_tokens)
    seq_len = batch["input_ids"].shape[1]
    cfg, note = _engine_config(args, seq_len)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    checkpoint = _random_checkpoint(config_path, Path(args.weights_dir), device)
    write_s = time.perf_counter() - t0
    if cfg.resolved_zero_stage == 2:
        _process_group(device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_model(cfg, hw, device, str(checkpoint), kernels=kernels)
    model.train()
    engine = build_engine(cfg, model, total_steps=args.warmup + args.steps + 1, precision=hw.precision,
                          device=device, world_size=1)
    build_s = time.perf_counter() - t0
    trainable, total = count_parameters(engine.model)
    lm_layers, clip_layers = checkpointable_layers(engine.model)
    lm_ckpt = sum(bool(layer.gradient_checkpointing) for layer in lm_layers)
    clip_ckpt = sum(bool(layer.gradient_checkpointing) for layer in clip_layers)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = train_step(engine, [batch])
        loss_value = float(out.loss_sum)  # forces the step to finish
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    flops = step_flops(Dims.from_config(engine.model.config), cfg.mode, micro_batch=args.micro_batch, seq_len=seq_len,
                       image_tokens=n_img, crops=crops, supervised=args.answer_tokens, lora_rank=args.lora_rank,
                       lora_vision=args.lora_vision, lm_checkpointed=lm_ckpt, clip_checkpointed=clip_ckpt)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in card), None)
    tokens = batch["input_ids"].numel()
    return {
        "card": card,
        "config": str(args.config),
        "mode": cfg.mode,
        "engine": engine.kind + (f" ({note})" if note else ""),
        "precision": hw.precision,
        "attention": hw.attention,
        "fused_kernels": kernels.line(fused_ops(model)).removeprefix("fused kernels: "),
        "activation_checkpointing": f"{args.activation_checkpointing}: {lm_ckpt}/{len(lm_layers)} LM, "
                                    f"{clip_ckpt}/{len(clip_layers)} CLIP",
        "micro_batch": args.micro_batch,
        "num_crops": args.num_crops,
        "seq_len": seq_len,
        "params_total": total,
        "params_trainable": trainable,
        "write_s": round(write_s, 1),
        "build_s": round(build_s, 2),
        "step_s": round(step_s, 4),
        "images_per_s": round(args.micro_batch / step_s, 3),
        "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_step": round(flops["model"] / 1e12, 3),
        "hardware_tflops_per_step": round(flops["hardware"] / 1e12, 3),
        "mfu": round(flops["model"] / step_s / peak, 4) if peak else None,
        "hfu": round(flops["hardware"] / step_s / peak, 4) if peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "final_loss": round(loss_value, 4),
        "grad_norm": round(float(out.grad_norm), 4),
    }


TABLE = (("mode", "mode"), ("engine", "engine"), ("fused_kernels", "fused kernels"),
         ("activation_checkpointing", "act. ckpt"), ("micro_batch", "micro"),
         ("step_s", "step s"), ("images_per_s", "img/s"), ("tokens_per_s", "tokens/s"), ("peak_mem_gb", "peak GiB"),
         ("mfu", "MFU"), ("hfu", "HFU"))


def table(rows: list[dict]) -> str:
    """A markdown table of bench results (one row per json line)."""
    def cell(key, value):
        if value is None:
            return "–"
        return f"{100 * value:.1f} %" if key in ("mfu", "hfu") else str(value)

    lines = ["| " + " | ".join(title for _, title in TABLE) + " |", "|" + "---|" * len(TABLE)]
    lines += ["| " + " | ".join(cell(k, row.get(k)) for k, _ in TABLE) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(official_config_path()),
                   help="checkpoint directory or config.json (weights are random); default: the official config")
    p.add_argument("--weights-dir", default="/tmp/phi3v-bench-random",
                   help="where random weights for a bare config.json are written once and reused")
    p.add_argument("--mode", default="full", choices=[m.value for m in Mode])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "eager", "flash_attention_2"])
    p.add_argument("--fused-kernels", default="auto", choices=KERNELS,
                   help="liger-kernel's fused RMSNorm, SwiGLU, rope and CLIP LayerNorm (auto: on CUDA when installed)")
    p.add_argument("--zero-stage", type=int, default=-1, choices=[-1, 0, 2],
                   help="-1: as training resolves it (ZeRO-2 for full/frozen_vision when deepspeed is installed)")
    p.add_argument("--activation-checkpointing", default="auto", choices=["auto", "all", "lm", "every_n", "none"])
    p.add_argument("--checkpoint-every-n", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--num-crops", type=int, default=16)
    p.add_argument("--page", type=int, nargs=2, default=(1700, 2200), metavar=("W", "H"))
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--lora-vision", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", help="append the result as a json line to this file")
    p.add_argument("--table", metavar="JSONL", help="print the results in JSONL as a markdown table and exit")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.table:
        rows = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        print(table(rows))
        return {"rows": len(rows)}
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
