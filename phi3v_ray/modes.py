"""Training modes, applied in one place: what is trainable, and where LoRA adapters go (SPEC §5).

- full:           everything trains (DeepSpeed ZeRO-2 in the recipe).
- frozen_vision:  CLIP, the projector and the separators are frozen; the text embedding trains
                  unless `freeze_text_embedding` (the recipe froze it by accident; here it is a choice).
- lora:           only LoRA adapters train. Targets: the LM's qkv_proj, o_proj, gate_up_proj,
                  down_proj and lm_head, plus (unless the vision side is frozen) CLIP's q/k/v/out_proj,
                  fc1, fc2 and img_projection.0/.2.
- qlora:          lora on a 4-bit NF4 base (the base is quantized when loading, see `load_model`).
                  On CPUs the base keeps bitsandbytes' plain 4-bit layout (`keep_plain_4bit_layout`).

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


def keep_plain_4bit_layout(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights; returns how many layers it touched.

    On CPUs with AVX512-BF16, bitsandbytes ≥ 0.49 repacks a Linear4bit's weight in place the first time
    it runs in eval mode without grad (generation). The repacking needs in_features to be a multiple of
    the quantization block (64): the tiny model's 32-wide CLIP layers fail with "shape '[32, 0]' is
    invalid". The repacked layout also stays after `model.train()`, where its kernel has no backward
    (bitsandbytes issue #2078 lists more of its hazards). Evaluation runs between training steps, so the
    base keeps the one layout training uses, on every CPU.
    """
    touched = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted by their element count."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def checkpointable_layers(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The decoder layers and the CLIP encoder layers that run (CLIP's unused last layer left out)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    image_embed = base.model.vision_embed_tokens
    clip = list(image_embed.vision_transformer.encoder.layers[: image_embed.num_feature_layers])
    return list(base.model.layers), clip


def enable_gradient_checkpointing(model: nn.Module, lm_layers=None, clip_layers=None) -> None:
    """Non-reentrant activation checkpointing of the given layer indices (None = every layer of that tower).

    transformers' `gradient_checkpointing_enable` also calls `enable_input_require_grads()`, which hooks
    every sub-model's input embedding, CLIP's patch embedding included: a frozen CLIP (frozen_vision, LoRA
    without vision adapters) would then run its whole backward for nothing. Non-reentrant checkpointing
    needs no input that requires grad, so those hooks are removed (see `drop_input_grad_hooks`).
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers ≥ 5.2x; the old name warns there
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    drop_input_grad_hooks(model)
    lm, clip = checkpointable_layers(model)
    for chosen, layers in ((lm_layers, lm), (clip_layers, clip)):
        chosen = set(range(len(layers))) if chosen is None else set(chosen)
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i in chosen


def drop_input_grad_hooks(model: nn.Module) -> None:
    """Remove transformers' "make the embedding output require grad" hooks (a no-op when there are none).

    Gradients reach every trainable weight without them; with them, frozen towers back-propagate.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(target, "disable_input_require_grads"):
        target.disable_input_require_grads()


def cast_trainable(model: nn.Module, dtype: torch.dtype) -> None:
    """Put trainable floating-point parameters (LoRA adapters) in `dtype`.

    PEFT keeps adapters in fp32 over a half-precision base (`autocast_adapter_dtype`): every adapter
    matmul then runs in fp32 or casts its input and weights on every call. Under bf16/fp16 training the
    adapters live in the compute dtype instead; the optimizer keeps the fp32 master copy (DDPEngine's
    master weights, or DeepSpeed's).
    """
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
