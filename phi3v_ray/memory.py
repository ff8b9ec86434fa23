"""What one training worker holds on its GPU, and the activation-checkpointing plan that follows.

    plan = checkpoint_plan("auto", dims, mode="full", ...)  # which LM / CLIP layers recompute in the backward

Checkpointing a layer keeps only its input for the backward and runs its forward a second time there:
+1 forward of that layer (≈ +33 % of its training FLOPs) for most of its activation memory back. With
memory to spare it is waste: `auto` checkpoints as few layers as the estimate below allows.

The estimate, per GPU, in bytes (N parameters, T trainable, w ranks, bf16/fp16 compute):

    fixed        ZeRO-2 (full, frozen_vision):  2N half module + (4 + 8 + 2)·T/w fp32 master, Adam m/v,
                                                half gradients, + 2 GiB of reduce/all-gather buckets
                 DDP, fp32 weights + autocast:  4N + 4T gradients + 8T Adam + 2N autocast weight copies
                 LoRA (half base):              2N + 20 bytes per adapter weight (half weight and
                                                gradient, fp32 master, its gradient, Adam m/v)
                 QLoRA:                         ½ byte per quantized weight + 4 bytes per other weight
                                                (prepare_model_for_kbit_training keeps them fp32) + 20T
    activations  tokens × bytes per layer, for every layer of a tower that back-propagates (the LM in
                 every mode; CLIP in full, and in LoRA with vision adapters). Without checkpointing a
                 decoder layer keeps ≈ 9·h + 4·i half values per token (its two norms' inputs and
                 outputs, q/k/v, the attention output, the residual, gate_up (2i), the activation and
                 the product), a CLIP layer ≈ 9·h + 2·i (fc1 and GELU outputs); a checkpointed layer
                 keeps its input (h) only.

Checked against the H200 table in bench/results/README.md (full, micro batch 4, DocVQA shape, pure
bf16 weights): 36.7 GiB (LM) + 29.3 GiB (CLIP) = 66 GiB of activations estimated, 72 GiB measured
(106.3 − 34.2 GiB, the difference also holding the fp32 logits of that older code).

The batch is not known when the model is built: auto assumes every example is `max_length` tokens
(data.max_length), all of them image tokens (one 336-px crop per 148 tokens), which overestimates
short examples. It then un-checkpoints layers, those giving back the most recompute FLOPs per byte
first (decoder layers before CLIP layers), while the total stays under 90 % of the GPU less 2 GiB.
Torch-free: it reads sizes from the model config only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 2**30
CLIP_TOKENS = 577  # tokens per 336-px crop: a class token + 24×24 patches
TOKENS_PER_CROP = 148  # image tokens per crop in the HD layout (2509 for a 17-crop page), separators included
POLICIES = ("auto", "all", "lm", "every_n", "none")


@dataclass(frozen=True)
class Dims:
    """The sizes the estimate needs, from a Phi3VConfig."""

    hidden: int
    intermediate: int
    layers: int
    kv_heads: int
    heads: int
    vocab: int
    clip_hidden: int
    clip_intermediate: int
    clip_layers: int  # the layers that run: the last CLIP layer is unused (hidden_states[-2])

    @classmethod
    def from_config(cls, config) -> "Dims":
        vc = config.vision_config
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_key_value_heads or config.num_attention_heads, config.num_attention_heads,
                   config.vocab_size, vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers - 1)

    # -- parameter counts (matmul weights; norms and biases are noise at this size)
    @property
    def lm_layer_params(self) -> int:
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        return h * (h + 2 * kv) + h * h + 3 * h * self.intermediate

    @property
    def clip_layer_params(self) -> int:
        return 4 * self.clip_hidden**2 + 2 * self.clip_hidden * self.clip_intermediate

    @property
    def projector_params(self) -> int:
        return 4 * self.clip_hidden * self.hidden + self.hidden**2

    @property
    def embedding_params(self) -> int:
        return 2 * self.vocab * self.hidden  # embed_tokens + lm_head

    @property
    def total_params(self) -> int:
        clip = (self.clip_layers + 1) * self.clip_layer_params + 3 * 14 * 14 * self.clip_hidden
        return self.layers * self.lm_layer_params + self.embedding_params + clip + self.projector_params

    def lora_params(self, rank: int, vision: bool) -> int:
        h, i, kv = self.hidden, self.intermediate, self.hidden * self.kv_heads // self.heads
        lm = self.layers * rank * ((h + h + 2 * kv) + 2 * h + (h + 2 * i) + (i + h)) + rank * (h + self.vocab)
        if not vision:
            return lm
        ch, ci = self.clip_hidden, self.clip_intermediate
        clip = self.clip_layers * rank * (4 * 2 * ch + 2 * (ch + ci))
        return lm + clip + rank * (4 * ch + h) + rank * 2 * h

    # -- activation bytes per token of one layer (half precision)
    @property
    def lm_layer_bytes(self) -> int:
        return 2 * (9 * self.hidden + 4 * self.intermediate)

    @property
    def clip_layer_bytes(self) -> int:
        return 2 * (9 * self.clip_hidden + 2 * self.clip_intermediate)


@dataclass(frozen=True)
class CheckpointPlan:
    """Indices of the decoder and CLIP layers that recompute their forward in the backward."""

    lm: tuple[int, ...]
    clip: tuple[int, ...]
    reason: str

    def __str__(self) -> str:
        return f"activation checkpointing: {len(self.lm)} decoder + {len(self.clip)} CLIP layers ({self.reason})"


def fixed_bytes(dims: Dims, mode: str, zero_stage: int, precision: str, world_size: int,
                lora_rank: int = 64, lora_vision: bool = True) -> float:
    """Weights, gradients and optimizer state on one GPU (see the module docstring)."""
    n = dims.total_params
    half = precision in ("bf16", "fp16")
    if mode in ("lora", "qlora"):
        adapters = 20 * dims.lora_params(lora_rank, lora_vision)
        if mode == "qlora":
            linear = dims.layers * dims.lm_layer_params + (dims.clip_layers + 1) * dims.clip_layer_params
            return 0.5 * linear + 4 * (n - linear) + adapters
        return (2 if half else 4) * n + adapters
    trainable = n if mode == "full" else n - (dims.clip_layers + 1) * dims.clip_layer_params - dims.projector_params
    if zero_stage == 2 and half:
        return 2 * n + 14 * trainable / world_size + 2 * GiB
    return 4 * n + 12 * trainable + (2 * n if half else 0)


def checkpoint_plan(policy: str, dims: Dims, *, mode: str, every_n: int = 2, gpu_memory_gb: float | None = None,
                    zero_stage: int = 0, precision: str = "bf16", world_size: int = 1, micro_batch: int = 1,
                    tokens_per_sample: int = 8192, lora_rank: int = 64, lora_vision: bool = True) -> CheckpointPlan:
    """The layers to checkpoint for `policy` (auto: from the memory estimate; all without a GPU)."""
    lm_all, clip_all = tuple(range(dims.layers)), tuple(range(dims.clip_layers))
    if policy == "all":
        return CheckpointPlan(lm_all, clip_all, "all: every decoder and CLIP layer")
    if policy == "lm":
        return CheckpointPlan(lm_all, (), "lm: decoder layers only")
    if policy == "every_n":
        return CheckpointPlan(lm_all[::every_n], clip_all[::every_n], f"every_n: one layer in {every_n}")
    if policy == "none":
        return CheckpointPlan((), (), "none")
    if policy != "auto":
        raise ValueError(f"activation_checkpointing={policy!r} is not one of {', '.join(POLICIES)}")
    if gpu_memory_gb is None:
        return CheckpointPlan(lm_all, clip_all, "auto: no GPU, every layer")

    clip_backward = mode == "full" or (mode in ("lora", "qlora") and lora_vision)
    tokens = micro_batch * tokens_per_sample
    clip_tokens = micro_batch * math.ceil(tokens_per_sample / TOKENS_PER_CROP) * CLIP_TOKENS
    fixed = fixed_bytes(dims, mode, zero_stage, precision, world_size, lora_rank, lora_vision)
    budget = 0.9 * gpu_memory_gb * GiB - 2 * GiB - fixed
    # Every back-propagating layer checkpointed: each keeps its input only.
    towers = {"lm": [dims.layers, tokens, dims.hidden, dims.lm_layer_bytes,
                     2 * dims.lm_layer_params + 2 * tokens_per_sample * dims.hidden]}
    if clip_backward:
        towers["clip"] = [dims.clip_layers, clip_tokens, dims.clip_hidden, dims.clip_layer_bytes,
                          2 * dims.clip_layer_params + 4 * CLIP_TOKENS * dims.clip_hidden]
    used = sum(layers * t * 2 * h for layers, t, h, _, _ in towers.values())
    kept = {"lm": 0, "clip": 0}  # layers left un-checkpointed
    # Recompute FLOPs saved per byte kept (both per token of the tower): the better ratio goes first.
    order = sorted(towers, key=lambda k: -towers[k][4] / towers[k][3])
    for name in order:
        layers, t, h, per_layer, _ = towers[name]
        extra = t * (per_layer - 2 * h)
        k = max(0, min(layers, int((budget - used) // extra))) if extra > 0 else layers
        kept[name] = k
        used += k * extra
    need = (fixed + used + 2 * GiB) / GiB
    lm = lm_all[kept["lm"]:]
    clip = clip_all[kept["clip"]:] if clip_backward else ()  # a frozen CLIP saves nothing for a backward
    why = (f"auto (~{need:.0f} of {gpu_memory_gb:.0f} GiB estimated for {micro_batch} × {tokens_per_sample} tokens, "
           f"{fixed / GiB:.0f} GiB weights/gradients/optimizer"
           + ("; does not fit even with every layer checkpointed" if need > gpu_memory_gb else "") + ")")
    return CheckpointPlan(lm, clip, why)


def plan_for_config(cfg, model_config, precision: str, gpu_memory_gb: float | None, world_size: int) -> CheckpointPlan:
    """`cfg.activation_checkpointing` (a TrainConfig) resolved for one worker's GPU."""
    return checkpoint_plan(
        cfg.activation_checkpointing, Dims.from_config(model_config), mode=cfg.mode, every_n=cfg.checkpoint_every_n,
        gpu_memory_gb=gpu_memory_gb, zero_stage=cfg.resolved_zero_stage, precision=precision, world_size=world_size,
        micro_batch=cfg.micro_batch, tokens_per_sample=cfg.data.max_length, lora_rank=cfg.lora_rank,
        lora_vision=cfg.lora_vision,
    )
