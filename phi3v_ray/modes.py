"""Training modes, applied in one place: what is trainable, and where LoRA adapters go (SPEC §5).

- full:           everything trains (DeepSpeed ZeRO-2 in the recipe).
- frozen_vision:  CLIP, the projector and the separators are frozen; the text embedding trains
                  unless `freeze_text_embedding` (the recipe froze it by accident; here it is a choice).
- lora:           only LoRA adapters train. Targets: the LM's qkv_proj, o_proj, gate_up_proj,
                  down_proj and lm_head, plus (unless the vision side is frozen) CLIP's q/k/v/out_proj,
                  fc1, fc2 and img_projection.0/.2.
- qlora:          lora on a 4-bit NF4 base (the base is quantized when loading, see `load_model`).

In every mode CLIP's last encoder layer and post_layernorm stay frozen: the model reads
hidden_states[-2], so they never get a gradient, and DDP would stall waiting for one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import Mode  # noqa: F401  (defined in the torch-free config, re-exported here)


@dataclass
class LoraSettings:
    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.0
    vision: bool = True  # adapters on CLIP and the projector too (the recipe's default)


LM_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def lora_target_regex(num_feature_layers: int, vision: bool) -> str:
    """A PEFT target regex matching exactly the SPEC §5 modules (and no module of the unused CLIP layer)."""
    parts = [rf"model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(LM_TARGETS)})", r"lm_head"]
    if vision:
        used = "|".join(str(i) for i in range(num_feature_layers))
        parts.append(
            rf"model\.vision_embed_tokens\.img_processor\.vision_model\.encoder\.layers\.({used})\."
            rf"(self_attn|mlp)\.({'|'.join(CLIP_TARGETS)})"
        )
        parts.append(r"model\.vision_embed_tokens\.img_projection\.(0|2)")
    return rf"^(?:.*\.)?(?:{'|'.join(parts)})$"


def apply_mode(
    model: nn.Module,
    mode: Mode | str,
    lora: LoraSettings | None = None,
    freeze_text_embedding: bool = False,
) -> nn.Module:
    """Set requires_grad for `mode` and wrap with PEFT adapters for lora/qlora. Returns the model to train."""
    mode = Mode(mode)
    base = model
    unused = {id(p) for p in base.unused_parameters()}
    if mode.uses_lora:
        from peft import LoraConfig, get_peft_model

        lora = lora or LoraSettings()
        image_embed = base.model.vision_embed_tokens
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            init_lora_weights="gaussian",
            target_modules=lora_target_regex(image_embed.num_feature_layers, lora.vision),
            bias="none",
        )
        if mode is Mode.QLORA:
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        model = get_peft_model(base, config)  # freezes everything but the adapters
        return model

    for name, param in base.named_parameters():
        trainable = id(param) not in unused
        if mode is Mode.FROZEN_VISION and "vision_embed_tokens" in name:
            trainable = False
        if freeze_text_embedding and name.endswith("model.embed_tokens.weight"):
            trainable = False
        param.requires_grad_(trainable)
    return base


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted by their element count."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every decoder and CLIP layer."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(target, "enable_input_require_grads"):
        # With a frozen embedding, checkpointed layers still need an input that requires grad.
        target.enable_input_require_grads()


def cast_trainable_to_fp32(model: nn.Module) -> None:
    """Keep trainable parameters (adapters) in fp32 when the frozen base runs in bf16/fp16."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
