"""Phi3VForCausalLM: transformers' Phi-3 decoder with the Phi-3.5-vision image embedding.

No remote code: the language model is transformers' own `Phi3Model`, the vision tower its
`CLIPVisionModel`; this file adds only what Phi-3.5-vision puts between them. Image k of a sample
fills the placeholder positions holding id −k (see processor.py for how they are laid out).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import CLIPPreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM, Phi3Model, Phi3PreTrainedModel

from ..constants import CROP_SIZE, IGNORE_INDEX, STOP_IDS
from .configuration import Phi3VConfig, flash_attn_available
from .image_embedding import Phi3VImageEmbedding
from .packed import packed_attention

logger = logging.getLogger(__name__)

# transformers renamed `past_key_values` to `cache` in 5.2x; accept whichever this version uses.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config_class = Phi3VConfig
    config: Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]

    def _init_weights(self, module):
        if getattr(module, "_phi3v_clip_owner", None) is not None:
            # The CLIP tower's own scheme (class embedding, positions, attention scales).
            CLIPPreTrainedModel._init_weights(module._phi3v_clip_owner, module)
        elif isinstance(module, Phi3VImageEmbedding):
            std = self.config.initializer_range
            torch.nn.init.normal_(module.glb_GN, std=std)
            torch.nn.init.normal_(module.sub_GN, std=std)
        else:
            super()._init_weights(module)


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    """Phi3Model plus `vision_embed_tokens`; images are merged into the token embeddings."""

    def __init__(self, config: Phi3VConfig):
        Phi3Model.__init__(self, config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.post_init()

    def embed(self, input_ids: torch.LongTensor, pixel_values=None, image_sizes=None) -> torch.Tensor:
        """Token embeddings with image features written over the placeholder (negative id) positions."""
        embeds = self.embed_tokens(input_ids.clamp_min(0))  # (B, T, hidden)
        is_image = input_ids < 0
        if not bool(is_image.any()):
            return self._touch_vision_tower(embeds)
        if pixel_values is None or image_sizes is None:
            raise ValueError("input_ids hold image placeholders but no pixel_values/image_sizes were given")
        features = self.vision_embed_tokens(pixel_values, image_sizes)  # list of (tokens_i, hidden)
        rows = []
        offset = 0
        for b in range(input_ids.shape[0]):
            n_images = int((-input_ids[b][is_image[b]]).max()) if bool(is_image[b].any()) else 0
            row = embeds[b]
            for k in range(1, n_images + 1):
                if offset >= len(features):
                    raise ValueError(
                        f"batch row {b} refers to image {k}, but only {len(features)} images were given in pixel_values"
                    )
                positions = (input_ids[b] == -k).nonzero(as_tuple=True)[0]
                feat = features[offset]
                if positions.numel() != feat.shape[0]:
                    raise ValueError(
                        f"image features and placeholder tokens differ for row {b}, image {k}: "
                        f"tokens {positions.numel()}, features {feat.shape[0]}"
                    )
                row = row.index_copy(0, positions, feat.to(row.dtype))
                offset += 1
            rows.append(row)
        if offset != len(features):
            raise ValueError(f"pixel_values hold {len(features)} images but input_ids have placeholders for {offset}")
        return torch.stack(rows, dim=0)

    def _touch_vision_tower(self, embeds: torch.Tensor) -> torch.Tensor:
        """A text-only batch with gradients on still runs the vision tower (on one blank crop) and adds 0 × its output.

        Under DDP every rank must produce gradients for the same parameters in the same order, and ZeRO-2
        reduces in buckets too: if one rank's batch has no image while another's has, the ranks' gradient
        reductions go out of step (gloo aborts). The zero-weighted pass gives the trainable vision
        parameters a (zero) gradient on every rank, every micro-batch.
        """
        tower = self.vision_embed_tokens
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())):  # not in eval/generation
            return embeds
        size = CROP_SIZE
        blank = torch.zeros(1, 2, 3, size, size, dtype=embeds.dtype, device=embeds.device)  # (1 image, global + 1 crop, 3, H, W)
        features = tower(blank, torch.tensor([[size, size]], device=embeds.device))  # list of (tokens, hidden)
        return embeds + 0.0 * features[0].sum().to(embeds.dtype)

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes)
        return Phi3Model.forward(self, inputs_embeds=inputs_embeds, **kwargs)


class Phi3VForCausalLM(Phi3VPreTrainedModel, Phi3ForCausalLM):
    """Causal LM over text and images; loads the official checkpoint layout without remote code."""

    def __init__(self, config: Phi3VConfig):
        Phi3VPreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a local checkpoint directory. Weights come only from safetensors; never remote code."""
        if kwargs.get("trust_remote_code"):
            raise ValueError("phi3v-ray never runs remote code; drop trust_remote_code")
        if "torch_dtype" in kwargs:  # the transformers 4.x name
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        kwargs["use_safetensors"] = True
        attn = kwargs.get("attn_implementation")
        if attn in (None, "flash_attention_2") and not flash_attn_available():
            if attn == "flash_attention_2":
                raise ImportError("attn_implementation='flash_attention_2' needs flash-attn and a CUDA GPU")
            kwargs["attn_implementation"] = "sdpa"  # the official config.json names flash_attention_2
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            detail = "; ".join(f"{k.replace('_', ' ')} ({len(v)}): {', '.join(map(str, v[:8]))}{' …' if len(v) > 8 else ''}" for k, v in problems.items())
            raise ValueError(f"{pretrained_model_name_or_path}: checkpoint does not match Phi3VForCausalLM: {detail}")
        return (model, info) if want_info else model

    def generate(self, *args, **kwargs):
        """transformers' generate, stopping on <|endoftext|> and <|end|> (config.json's eos id 2 is stale)."""
        kwargs.setdefault("eos_token_id", list(STOP_IDS))
        kwargs.setdefault("pad_token_id", STOP_IDS[0])
        return super().generate(*args, **kwargs)

    def unused_parameters(self) -> list[torch.nn.Parameter]:
        return self.model.vision_embed_tokens.unused_parameters()

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        image_sizes=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        loss_only: bool = False,
        num_items_in_batch: int | float | torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """loss_only=True (training): logits are computed only where a label is supervised, which
        saves the (tokens × 32064) fp32 logit tensor; `logits` then holds just those rows.

        num_items_in_batch (training, as in transformers): the loss is the sum of the token losses
        divided by this number (the supervised tokens of the whole optimizer step) instead of this
        batch's token mean, so a token weighs the same however the step was cut into micro-batches.

        cu_seqlens, max_seqlen (a packed batch, `phi3v_ray.packing`): samples laid end to end in a row,
        with position_ids restarting per sample; attention stays within each sample (`packed.py`:
        flash-attn's varlen kernel, or a block-diagonal mask) and attention_mask is not read.
        """
        if cu_seqlens is not None:
            if position_ids is None:
                raise ValueError("a packed batch (cu_seqlens) needs its position_ids")
            shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            attention_mask, packed_kwargs = packed_attention(self.config._attn_implementation, cu_seqlens, max_seqlen,
                                                             tuple(shape), self.dtype)
            kwargs.update(packed_kwargs)
        elif position_ids is None and attention_mask is not None:
            # Positions count real tokens only, so left-padded generation sees the same positions as unpadded.
            length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -length:]
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        cache = getattr(outputs, _CACHE_FIELD, None)
        if loss_only and labels is not None:
            shift_labels = labels[:, 1:].to(hidden.device)
            supervised = shift_labels != IGNORE_INDEX
            logits = self.lm_head(hidden[:, :-1][supervised]).float()  # (n_supervised, vocab)
            loss = _token_loss(logits, shift_labels[supervised], num_items_in_batch)
            return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()  # (B, T, vocab); logits in fp32 as the reference does

        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross entropy over supervised positions (labels != -100): their mean, or their sum
    divided by num_items_in_batch when it is given."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    keep = shift_labels != IGNORE_INDEX
    return _token_loss(shift_logits[keep], shift_labels[keep], num_items_in_batch)


def _token_loss(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross entropy of (n, vocab) logits: the mean over n, or the sum over n / num_items_in_batch."""
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch
